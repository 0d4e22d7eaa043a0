"""Every selective_scan impl equals a float64 NumPy loop, in value and in every gradient.

The reference forward and its adjoint (hand-derived backward loop) are written here in NumPy,
independently of the code under test: out = ((C·h) + D u) ⊙ SiLU(z), h_t = exp(Δ_t A) h_{t-1}
+ Δ_t u_t B_t, Δ = softplus(δ + bias).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax.ops.scan import selective_scan

IMPLS = ("reference", "associative", "chunked", "pallas", "pallas_lanes")
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


def check_against_numpy(impl, x, dtype, tol, seed, softplus=True, **kwargs):
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
      delta_softplus=softplus, z=a.get("z"), impl=impl, **kwargs,
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
  check_against_numpy(impl, x, jnp.float32, 1e-5, seed, chunk_size=chunk)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_match_float64_loop(impl):
  rng, seed = _rng()
  x, chunk = _random_case(rng)
  check_against_numpy(impl, x, jnp.bfloat16, 1e-2, seed, chunk_size=chunk)


@pytest.mark.parametrize("impl", ["associative", "pallas", "pallas_lanes"])
def test_without_gate_or_softplus(impl):
  rng, seed = _rng()
  x = random_inputs(rng, 2, 13, 3, 4)
  x["z"] = None
  x["delta"] = rng.uniform(0.01, 0.5, size=x["delta"].shape)
  x["delta_bias"] = rng.uniform(0.0, 0.1, size=x["delta_bias"].shape)
  check_against_numpy(impl, x, jnp.float32, 1e-5, seed, softplus=False, chunk_size=4)


def _assert_fused_matches_numpy(scan, x, chunk, seed):
  """A fused kernel's wrapper (softplus and gate on) against the float64 loop: value and every
  gradient in fp32, relative error <= 1e-5; the value also from a forward with no backward (the
  primal path, which keeps no states)."""
  args = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
  g = np.random.default_rng(seed).normal(size=x["u"].shape)

  def forward(a):
    return scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["delta_bias"], True, a["z"],
                chunk)  # fmt: skip

  def loss(a):
    out = forward(a)
    return jnp.sum(out * g), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(args)
  want_out, want_grads = numpy_scan(x, g)
  assert rel_err(out, want_out) <= 1e-5, seed
  assert rel_err(jax.jit(forward)(args), want_out) <= 1e-5, seed
  for k in FIELDS:
    assert rel_err(grads[k], want_grads[k]) <= 1e-5, (k, seed)


def test_pallas_multiple_channel_blocks_and_full_chunks():
  """Several programs along channels (other blocks in the backward), whole chunks and a tail."""
  from dim_jax.ops import scan_pallas

  rng, seed = _rng()
  x = random_inputs(rng, 2, 19, 12, 16)
  scan = functools.partial(scan_pallas.selective_scan_pallas, block_d=8, bwd_block_d=4)
  _assert_fused_matches_numpy(scan, x, 8, seed)


@pytest.mark.parametrize(
  "segments, chunk, lane_reduce, save_every, fwd_block_d, fwd_chunk, fast_act",
  [
    (3, 4, True, 1, 32, 4, True),
    (2, 8, False, 1, 32, 8, False),
    (2, 2, True, 3, 32, 3, True),
    (1, 4, True, 1, 64, 4, True),
    (1, 2, True, 2, 64, 4, False),
  ],
)
def test_pallas_lanes_segments_and_channel_blocks(
  segments, chunk, lane_reduce, save_every, fwd_block_d, fwd_chunk, fast_act
):  # fmt: skip
  """The sequence split over programs (length padded to segments x chunks), several channel
  blocks (dB, dC summed over blocks, by the warp butterfly or by one sum per value), states kept
  only every few chunks (recomputed in the backward), a forward with wider blocks or longer
  chunks than the backward, with the fast or the exact softplus and sigmoid, in value and every
  gradient."""
  from dim_jax.ops import scan_pallas_lanes

  rng, seed = _rng()
  x = random_inputs(rng, 2, 19, 40, 3)
  scan = functools.partial(
    scan_pallas_lanes.selective_scan_pallas_lanes, block_d=32, segments=segments,
    lane_reduce=lane_reduce, save_every=save_every, fwd_block_d=fwd_block_d, fwd_chunk=fwd_chunk,
    fast_act=fast_act,
  )  # fmt: skip
  _assert_fused_matches_numpy(scan, x, chunk, seed)


def test_pallas_lanes_rejects_a_forward_chunk_that_misses_the_saved_states():
  from dim_jax.ops import scan_pallas_lanes

  x = random_inputs(np.random.default_rng(0), 1, 8, 32, 4)
  with pytest.raises(ValueError, match="fwd_chunk=3 must divide chunk_size x save_every = 4"):
    scan_pallas_lanes.selective_scan_pallas_lanes(
      *(x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")), True, x["z"], 2,
      save_every=2, fwd_chunk=3,
    )  # fmt: skip


def test_lane_sums_give_each_lane_one_warp_sum():
  """The butterfly over a (64,) vector = 2 warps: lane l of warp w holds the sum of values[l]
  over warp w's 32 elements (the interpreter's permutation stands in for the shuffles)."""
  from dim_jax.ops.scan_pallas_lanes_kernels import lane_sums

  rng, _ = _rng()
  values = rng.normal(size=(32, 64))
  got = np.asarray(lane_sums([jnp.asarray(v, jnp.float32) for v in values], native=False))
  want = values.reshape(32, 2, 32).sum(axis=2).T.reshape(64)  # [warp, lane] -> sum of values[lane]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas", "pallas_lanes"])
def test_kernels_lower_to_triton_for_h200(impl):
  """Forward and backward kernels lower to Triton IR for an H200 (sm_90) without a GPU: the
  lowering reads the target from an abstract device. Triton's own compile runs only on a GPU."""
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

  from dim_jax.ops import scan_pallas, scan_pallas_lanes

  def scan(u, delta, A, B, C, D, bias, z):
    if impl == "pallas":
      return scan_pallas.selective_scan_pallas(
        u, delta, A, B, C, D, bias, True, z, 8, interpret=False
      )
    return scan_pallas_lanes.selective_scan_pallas_lanes(
      u, delta, A, B, C, D, bias, True, z, 4, block_d=64, num_warps=2, segments=2,
      interpret=False,
    )  # fmt: skip

  def grads(*a):
    return jax.grad(lambda *a: jnp.sum(scan(*a).astype(jnp.float32)), argnums=range(8))(*a)

  rows, rows_n = jax.ShapeDtypeStruct((2, 40, 64), jnp.bfloat16), (2, 40, 16)
  rows_n = jax.ShapeDtypeStruct(rows_n, jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((64,), jnp.float32)
  args = (rows, rows, jax.ShapeDtypeStruct((64, 16), jnp.float32), rows_n, rows_n, vec, vec, rows)
  h200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h200)):
    for fn, kernels in ((scan, 1), (grads, 2)):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      want = kernels * (2 if impl == "pallas_lanes" else 1)  # segments: one more pass each way
      assert text.count("__gpu$xla.gpu.triton") == want, (impl, fn.__name__)


def test_unknown_impl_names_valid_ones():
  x = jnp.zeros((1, 2, 3))
  with pytest.raises(
    ValueError, match="reference, associative, chunked, pallas, pallas_lanes, auto"
  ):
    selective_scan(x, x, jnp.zeros((3, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)),
                   jnp.zeros(3), impl="cuda")  # fmt: skip


def test_lanes_forward_takes_two_channels_per_lane_only_when_programs_stay_many():
  from dim_jax.ops.scan_pallas_lanes import default_fwd_block_d

  assert default_fwd_block_d(64, 3072, 32, 1, 1) == 64  # DiM-H at 256²: 3072 programs
  assert default_fwd_block_d(8, 3072, 32, 1, 1) == 32  # 512², batch 8: 384 programs would be few
  assert default_fwd_block_d(1, 9216, 32, 1, 32) == 32  # split sequences keep the backward's
  assert default_fwd_block_d(64, 3072, 64, 1, 1) == 64  # already two channels per lane


def test_lanes_kernel_splits_the_sequence_only_when_programs_are_few():
  from dim_jax.ops.scan_pallas_lanes import default_segments

  # DiM-H at 256² (batch 64): 64 x 3072/32 = 6144 programs fill 132 SMs; no split.
  assert default_segments(64, 366, 3072, 32) == 1
  # 1536², batch 1: 96 programs; 9216 steps give 32 segments of 288 steps.
  assert default_segments(1, 9216, 3072, 32) == 32
  # 32 segments of fewer than 128 steps: no split.
  assert default_segments(1, 4095, 3072, 32) == 1
  # Few programs but a short sequence: a second pass of exps would not pay.
  assert default_segments(1, 500, 3072, 32) == 1
  # Exactly at the threshold of 4 programs per SM: no split.
  assert default_segments(11, 4096, 1536, 32) == 1 and default_segments(10, 4096, 1536, 32) == 32


def test_fast_activations_match_float64_over_the_fp32_range():
  """The lanes kernels' softplus (log1p from ex2 / lg2 with the rounding of 1 + e put back) and
  sigmoid (ex2 / rcp), with exact jnp stand-ins for the PTX instructions, against float64 from
  -80 to 80 (fp32 results stay normal there) and at random points."""
  from dim_jax.ops.scan_pallas_lanes_kernels import activation_sigmoid, activation_softplus

  rng, _ = _rng()
  x = np.concatenate([np.linspace(-80, 80, 100_001), rng.normal(0.0, 4.0, 50_000)])
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  softplus = np.asarray(activation_softplus(jnp.asarray(x), True, False), np.float64)
  sigmoid = np.asarray(activation_sigmoid(jnp.asarray(x), True, False), np.float64)
  assert np.max(np.abs(softplus - np.logaddexp(0.0, x64)) / np.logaddexp(0.0, x64)) < 1e-5
  want = 1.0 / (1.0 + np.exp(-x64))
  assert np.max(np.abs(sigmoid - want) / want) < 1e-5
