"""The Pallas TPU scan (impl="pallas_tpu"): the interpreter against the float64 loop of
test_selective_scan, the Mosaic kernels lowered for TPU, and, where libtpu is installed (`make
venv`), compiled by Mosaic and XLA:TPU for compile-only chips of each generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import tpu_lowering
from dim_jax.ops import ScanConfig
from dim_jax.ops.scan import tpu
from tests.test_selective_scan import _rng, check_against_numpy, random_inputs

NO_LIBTPU = "libtpu absent (make venv installs it; or set TPU_LIBRARY_PATH): lowering only"


def test_fp32_matches_float64_loop_over_chunks_and_channel_blocks():
  """Odd length (3 chunks of 16, the last padded), odd state count, channels padded from 300 to
  two blocks of 256; value and every gradient."""
  rng, seed = _rng()
  x = random_inputs(rng, 2, 37, 300, 5)
  check_against_numpy("pallas_tpu", x, jnp.float32, 1e-5, seed, chunk=16)


def test_bf16_inputs_match_float64_loop():
  rng, seed = _rng()
  x = random_inputs(rng, 2, 29, 6, 4)
  check_against_numpy("pallas_tpu", x, jnp.bfloat16, 1e-2, seed, chunk=8)


def test_without_gate_or_softplus():
  rng, seed = _rng()
  x = random_inputs(rng, 1, 11, 3, 4)
  x["z"] = None
  x["delta"] = rng.uniform(0.01, 0.5, size=x["delta"].shape)
  check_against_numpy("pallas_tpu", x, jnp.float32, 1e-5, seed, softplus=False)


def test_rejects_blocks_off_the_register_tile():
  x = random_inputs(np.random.default_rng(0), 1, 20, 4, 2)
  args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
  with pytest.raises(ValueError, match=r"model.scan.chunk=12 \(block_d=256\) for pallas_tpu: use"):
    tpu.selective_scan(*args, True, x["z"], ScanConfig("pallas_tpu", chunk=12))
  with pytest.raises(ValueError, match="use a multiple of 8 steps"):
    tpu.selective_scan(*args, True, x["z"], ScanConfig("pallas_tpu"), block_d=96)


def test_default_blocks_fit_the_smallest_vmem():
  """Forward and backward blocks plus scratch leave headroom in a v4 core's 16 MiB."""
  cfg = tpu.KernelConfig(tpu.DEFAULT_BLOCK_D, tpu.DEFAULT_CHUNK, True, None)
  for backward in (False, True):
    assert tpu.vmem_bytes(cfg, 16, 4, backward) <= tpu.VMEM_CAPACITY - tpu.VMEM_HEADROOM


def _dim_h_scan_args(batch=2, length=366, channels=3072, state=16):
  """Abstract bf16 inputs at DiM-H's width and 256² length."""
  rows = jax.ShapeDtypeStruct((batch, length, channels), jnp.bfloat16)
  rows_n = jax.ShapeDtypeStruct((batch, length, state), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((channels,), jnp.float32)
  a = jax.ShapeDtypeStruct((channels, state), jnp.float32)
  return rows, rows, a, rows_n, rows_n, vec, vec, rows


def _scan(u, delta, A, B, C, D, bias, z):
  return tpu.selective_scan(u, delta, A, B, C, D, bias, True, z, ScanConfig("pallas_tpu"))


def _grads(*args):
  return jax.grad(lambda *a: jnp.sum(_scan(*a).astype(jnp.float32)), argnums=range(8))(*args)


def test_kernels_lower_for_tpu():
  """On a CPU host, lowering for the tpu platform embeds the Mosaic kernels (one forward; the
  gradient's forward and backward), not the interpreter."""
  args = _dim_h_scan_args()
  for fn, kernels in ((_scan, 1), (_grads, 2)):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == kernels, fn.__name__


@pytest.mark.parametrize("generation", ["v4:2x2x1", "v5p:2x2x1", "v6e:2x2"])
def test_kernels_compile_for_each_tpu_generation(generation):
  """Mosaic accepts the kernels' shapes and layouts (its layout passes run only here, in
  libtpu's compiler) at DiM-H's width: on v4 (16 MiB of VMEM), v5p (the pod recipes') and v6e."""
  devices = tpu_lowering.compile_only_devices(generation)
  if devices is None:
    pytest.skip(NO_LIBTPU)
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
  one_chip = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_chip) for a in _dim_h_scan_args()]
  compiled = tpu_lowering.compile_for_tpu(jax.jit(_grads).trace(*args).lower())
  assert compiled.as_text().count("custom-call") >= 2


@pytest.fixture(scope="module")
def tiny_dim_config():
  from configs import pretrain_256

  c = pretrain_256.get_config()
  c.model.update(variant="", width=32, depth=3, patch_size=2, input_size=8, d_state=16)
  c.model.update(remat="block")
  c.model.scan.impl = "pallas_tpu"
  c.train.batch_size = 8
  return c


def test_tiny_dim_train_step_lowers_for_a_v5p_slice(tiny_dim_config):
  """The recipe's train step (bf16, block remat, FSDP) over 4 v5p chips: each layer's scan runs
  as Mosaic kernels (forward, its recompute under remat, backward), each on its chip's 2 rows of
  the batch of 8. (benchmarks/tpu_lowering.py compiles the DiM-H step the same way.)"""
  mesh, _ = tpu_lowering.tpu_mesh(tiny_dim_config.mesh, "v5p:2x2x1", 4, compile=False)
  lowered, state = tpu_lowering.train_step_for_tpu(tiny_dim_config, mesh, compiles=False)
  text = lowered.as_text()
  assert tpu_lowering.kernel_rows(text) == [2] * 3 * tiny_dim_config.model.depth
  assert "mhlo.num_partitions = 4" in text
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert tpu_lowering.per_chip_bytes(state) < whole  # FSDP: each chip holds a part
