"""Every selective_scan impl equals a float64 NumPy loop, in value and in every gradient.

The reference forward and its adjoint (hand-derived backward loop) are written here in NumPy,
independently of the code under test: out = ((C·h) + D u) ⊙ SiLU(z), h_t = exp(Δ_t A) h_{t-1}
+ Δ_t u_t B_t, Δ = softplus(δ + bias).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax.ops import ScanConfig, selective_scan
from dim_jax.ops.scan import gpu

IMPLS = ("reference", "associative", "chunked", "pallas_gpu")
FIELDS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_scan(x, g, softplus=True):
  """float64 forward and its gradients for the loss sum(out * g); x holds the named inputs.

  x["z"] = None means no gate (SiLU(z) replaced by 1; no dz).
  """
  gated = x["z"] is not None
  x = dict(x, z=x["z"] if gated else np.zeros_like(x["u"]))
  u, delta, A, B, C, D, z, bias = (np.asarray(x[k], np.float64) for k in FIELDS)
  g = np.asarray(g, np.float64)
  batch, length, channels = u.shape
  pre = delta + bias
  dt = np.log1p(np.exp(pre)) if softplus else pre
  decay = np.exp(dt[..., None] * A)  # (Bt, L, D, N)
  h = np.zeros((batch, length + 1, channels, A.shape[1]))  # h[:, t + 1] is h_t
  for t in range(length):
    drive = (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
    h[:, t + 1] = decay[:, t] * h[:, t] + drive
  y = np.einsum("bldn,bln->bld", h[:, 1:], C) + u * D
  silu_z = z * _sigmoid(z) if gated else np.ones_like(z)
  out = y * silu_z

  # Backward: adjoint of the recurrence, walked in reverse.
  grads = {
    k: np.zeros_like(v) for k, v in zip(FIELDS, (u, delta, A, B, C, D, z, bias), strict=True)
  }
  sig = _sigmoid(z)
  grads["z"] = g * y * sig * (1 + z * (1 - sig))
  gy = g * silu_z  # (Bt, L, D)
  grads["D"] = np.sum(gy * u, axis=(0, 1))
  grads["u"] = gy * D
  grads["C"] = np.einsum("bld,bldn->bln", gy, h[:, 1:])
  d_dt = np.zeros_like(dt)
  dh = np.zeros((batch, channels, A.shape[1]))
  for t in reversed(range(length)):
    dh = gy[:, t, :, None] * C[:, t, None, :] + dh  # dh now d loss / d h_t
    d_decay = dh * h[:, t]
    grads["A"] += np.sum(d_decay * decay[:, t] * dt[:, t, :, None], axis=0)
    d_dt[:, t] += np.sum(d_decay * decay[:, t] * A, axis=-1)
    d_dt[:, t] += u[:, t] * np.einsum("bdn,bn->bd", dh, B[:, t])
    grads["u"][:, t] += dt[:, t] * np.einsum("bdn,bn->bd", dh, B[:, t])
    grads["B"][:, t] += np.einsum("bdn,bd->bn", dh, dt[:, t] * u[:, t])
    dh = dh * decay[:, t]  # carried to h_{t-1}
  grads["delta"] = d_dt * _sigmoid(pre) if softplus else d_dt
  grads["delta_bias"] = np.sum(grads["delta"], axis=(0, 1))
  if not gated:
    del grads["z"]
  return out, grads


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def random_inputs(rng, batch, length, channels, state):
  return {
    "u": rng.normal(size=(batch, length, channels)),
    "delta": rng.normal(-1.0, 1.0, size=(batch, length, channels)),
    "A": -np.exp(rng.uniform(-1.0, 1.5, size=(channels, state))),
    "B": rng.normal(size=(batch, length, state)),
    "C": rng.normal(size=(batch, length, state)),
    "D": rng.normal(size=(channels,)),
    "z": rng.normal(size=(batch, length, channels)),
    "delta_bias": rng.normal(0.0, 0.5, size=(channels,)),
  }


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def check_against_numpy(impl, x, dtype, tol, seed, softplus=True, chunk=0):
  """Value and gradients of every input of `selective_scan(impl)` vs `numpy_scan`."""
  rng = np.random.default_rng(seed)
  # bf16 inputs: the reference sees the same rounded values the kernel sees, the output's
  # cotangent g included (it reaches the backward pass in the output's dtype).
  g = np.asarray(jnp.asarray(rng.normal(size=x["u"].shape), dtype), np.float64)
  low = {k: v if v is None else np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in x.items()}
  low["A"], low["D"], low["delta_bias"] = x["A"], x["D"], x["delta_bias"]  # parameters stay fp32
  want_out, want_grads = numpy_scan(low, g, softplus)
  args = {k: jnp.asarray(v, jnp.float32) for k, v in low.items() if v is not None}
  for k in ("u", "delta", "B", "C", "z"):
    if k in args:
      args[k] = args[k].astype(dtype)

  def loss(a):
    out = selective_scan(
      a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], delta_bias=a["delta_bias"],
      delta_softplus=softplus, z=a.get("z"), config=ScanConfig(impl, chunk=chunk),
    )  # fmt: skip
    return jnp.sum(out.astype(jnp.float32) * g), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(args)
  assert out.dtype == dtype, (impl, out.dtype)
  err = rel_err(out, want_out)
  assert err <= tol, f"{impl} output rel err {err:.2e} > {tol} (seed {seed})"
  for k in want_grads:
    assert grads[k].dtype == args[k].dtype, (impl, k, grads[k].dtype)
    err = rel_err(grads[k], want_grads[k])
    assert err <= tol, f"{impl} d{k} rel err {err:.2e} > {tol} (seed {seed})"


def _random_case(rng):
  """Batch > 1, an odd length (never a multiple of the chunk), odd channel and state counts."""
  batch, length = int(rng.integers(2, 4)), int(rng.integers(4, 14)) * 2 + 1
  channels, state = int(rng.integers(2, 7)), int(rng.integers(2, 6))
  chunk = int(rng.integers(2, 5)) * 2  # even: never divides the odd length
  return random_inputs(rng, batch, length, channels, state), chunk


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_matches_float64_loop(impl):
  rng, seed = _rng()
  x, chunk = _random_case(rng)
  check_against_numpy(impl, x, jnp.float32, 1e-5, seed, chunk=chunk)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_match_float64_loop(impl):
  rng, seed = _rng()
  x, chunk = _random_case(rng)
  check_against_numpy(impl, x, jnp.bfloat16, 1e-2, seed, chunk=chunk)


@pytest.mark.parametrize("impl", ["associative", "pallas_gpu"])
def test_without_gate_or_softplus(impl):
  rng, seed = _rng()
  x = random_inputs(rng, 2, 13, 3, 4)
  x["z"] = None
  x["delta"] = rng.uniform(0.01, 0.5, size=x["delta"].shape)
  x["delta_bias"] = rng.uniform(0.0, 0.1, size=x["delta_bias"].shape)
  check_against_numpy(impl, x, jnp.float32, 1e-5, seed, softplus=False, chunk=4)


@pytest.mark.parametrize(
  "segments, chunk, save_every, fwd_chunk, fwd_block_d",
  [(3, 4, 1, 4, 32), (2, 8, 1, 8, 32), (2, 2, 3, 3, 32), (1, 4, 1, 4, 64), (1, 2, 2, 4, 64)],
)
def test_kernel_settings_match_float64_loop(segments, chunk, save_every, fwd_chunk, fwd_block_d):
  """The sequence split over programs (length padded to segments x chunks), several channel
  blocks (dB, dC summed over blocks), states kept only every few chunks (recomputed in the
  backward), a forward with wider blocks or longer chunks than the backward: value and every
  gradient in fp32, also the value of a forward with no backward (which keeps no states)."""
  rng, seed = _rng()
  x = random_inputs(rng, 2, 19, 40, 3)
  config = ScanConfig(
    "pallas_gpu", chunk=chunk, save_every=save_every, fwd_chunk=fwd_chunk, segments=segments
  )
  args = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
  g = np.random.default_rng(seed).normal(size=x["u"].shape)

  def forward(a):
    fields = (a[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
    return gpu.selective_scan(*fields, True, a["z"], config, fwd_block_d=fwd_block_d)

  def loss(a):
    out = forward(a)
    return jnp.sum(out * g), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(args)
  want_out, want_grads = numpy_scan(x, g)
  assert rel_err(out, want_out) <= 1e-5, seed
  assert rel_err(jax.jit(forward)(args), want_out) <= 1e-5, seed
  for k in FIELDS:
    assert rel_err(grads[k], want_grads[k]) <= 1e-5, (k, seed)


def test_kernel_rejects_a_forward_chunk_that_misses_the_saved_states():
  x = jnp.zeros((1, 8, 32))
  config = ScanConfig("pallas_gpu", chunk=2, save_every=2, fwd_chunk=3)
  with pytest.raises(ValueError, match="fwd_chunk=3 must divide chunk x save_every = 4"):
    selective_scan(x, x, jnp.zeros((32, 4)), x[..., :4], x[..., :4], jnp.zeros(32), config=config)


def test_lane_sums_give_each_lane_one_warp_sum():
  """The butterfly over a (64,) vector = 2 warps: lane l of warp w holds the sum of values[l]
  over warp w's 32 elements (the interpreter's permutation stands in for the shuffles)."""
  from dim_jax.ops.scan.gpu_kernels import lane_sums

  rng, _ = _rng()
  values = rng.normal(size=(32, 64))
  got = np.asarray(lane_sums([jnp.asarray(v, jnp.float32) for v in values], native=False))
  want = values.reshape(32, 2, 32).sum(axis=2).T.reshape(64)  # [warp, lane] -> sum of values[lane]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kernels_lower_to_triton_for_h200():
  """Forward and backward kernels (the sequence split's too) lower to Triton IR for an H200
  (sm_90) without a GPU: the lowering reads the target from an abstract device. Triton's own
  compile runs only on a GPU."""
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

  config = ScanConfig("pallas_gpu", chunk=4, segments=2)

  def scan(u, delta, A, B, C, D, bias, z):
    return gpu.selective_scan(
      u, delta, A, B, C, D, bias, True, z, config, fwd_block_d=64, interpret=False
    )

  def grads(*a):
    return jax.grad(lambda *a: jnp.sum(scan(*a).astype(jnp.float32)), argnums=range(8))(*a)

  rows, rows_n = jax.ShapeDtypeStruct((2, 40, 64), jnp.bfloat16), (2, 40, 16)
  rows_n = jax.ShapeDtypeStruct(rows_n, jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((64,), jnp.float32)
  args = (rows, rows, jax.ShapeDtypeStruct((64, 16), jnp.float32), rows_n, rows_n, vec, vec, rows)
  h200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h200)):
    for fn, kernels in ((scan, 2), (grads, 4)):  # segment ends + forward; + adjoints + backward
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("__gpu$xla.gpu.triton") == kernels, fn.__name__


def test_unknown_impl_names_valid_ones():
  x = jnp.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="impl='cuda'.*reference, associative, chunked, pallas_gpu"):
    selective_scan(x, x, jnp.zeros((3, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)),
                   jnp.zeros(3), config=ScanConfig("cuda"))  # fmt: skip


def test_forward_takes_two_channels_per_lane_only_when_programs_stay_many():
  assert gpu.default_fwd_block_d(64, 3072, 1) == 64  # DiM-H at 256²: 3072 programs
  assert gpu.default_fwd_block_d(8, 3072, 1) == 32  # 512², batch 8: 384 programs would be few
  assert gpu.default_fwd_block_d(1, 9216, 32) == 32  # split sequences keep the backward's


def test_kernel_splits_the_sequence_only_when_programs_are_few():
  # DiM-H at 256² (batch 64): 64 x 3072/32 = 6144 programs fill 132 SMs; no split.
  assert gpu.default_segments(64, 366, 3072) == 1
  # 1536², batch 1: 96 programs; 9216 steps give 32 segments of 288 steps.
  assert gpu.default_segments(1, 9216, 3072) == 32
  # 32 segments of fewer than 128 steps: no split.
  assert gpu.default_segments(1, 4095, 3072) == 1
  # Few programs but a short sequence: a second pass of exps would not pay.
  assert gpu.default_segments(1, 500, 3072) == 1
  # Exactly at the threshold of 4 programs per SM: no split.
  assert gpu.default_segments(11, 4096, 1536) == 1 and gpu.default_segments(10, 4096, 1536) == 32


def test_fast_activations_match_float64_over_the_fp32_range():
  """The kernels' softplus (log1p from ex2 / lg2 with the rounding of 1 + e put back) and
  sigmoid (ex2 / rcp), with exact jnp stand-ins for the PTX instructions, against float64 from
  -80 to 80 (fp32 results stay normal there) and at random points."""
  from dim_jax.ops.scan.gpu_kernels import activation_sigmoid, activation_softplus

  rng, _ = _rng()
  x = np.concatenate([np.linspace(-80, 80, 100_001), rng.normal(0.0, 4.0, 50_000)])
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  softplus = np.asarray(activation_softplus(jnp.asarray(x), False), np.float64)
  sigmoid = np.asarray(activation_sigmoid(jnp.asarray(x), False), np.float64)
  assert np.max(np.abs(softplus - np.logaddexp(0.0, x64)) / np.logaddexp(0.0, x64)) < 1e-5
  want = 1.0 / (1.0 + np.exp(-x64))
  assert np.max(np.abs(sigmoid - want) / want) < 1e-5
