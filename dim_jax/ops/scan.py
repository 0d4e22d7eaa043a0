"""Mamba-1's selective scan (S6), with one switch for how the recurrence runs.

Semantics (Mamba, arXiv 2312.00752, Alg. 2; `reference/selective-scan.md` §3.1, §5), per sample,
channel d and state n:

  Δ_t     = softplus(δ_t + bias)                       (or δ_t + bias without softplus)
  h_t     = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t        ZOH for A, Euler for B; h_0 = 0
  y_t     = C_t · h_t + D u_t
  out_t   = y_t ⊙ SiLU(z_t)                             (when a gate z is given)

Δ, exp(ΔA), the state and y are float32 whatever the input dtype (a bf16 exp(ΔA) rounds decays
like 0.999 to 1 and the state stops forgetting); the output has u's dtype.

Implementations (`impl=`):
  reference    sequential `lax.scan` over time: the oracle, O(L·D·N) memory for its gradient
  associative  `lax.associative_scan` over (B, L, D, N) pairs: parallel, but materialises them
  chunked      `lax.scan` over chunks carrying h, associative scan inside each rematerialised chunk
  pallas       fused kernel (`scan_pallas.py`): state on chip, custom VJP recomputing per chunk
  pallas_lanes the same with one GPU lane per channel, N states in its registers, and an optional
               split of the sequence over programs (`scan_pallas_lanes.py`)
  auto         the fastest correct one for the platform (see `_auto_impl`)
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dim_jax import parallel

IMPLS = ("reference", "associative", "chunked", "pallas", "pallas_lanes", "auto")


def discretised_delta(delta: jax.Array, delta_bias: jax.Array | None, softplus: bool) -> jax.Array:
  """Δ = softplus(δ + bias) in float32; (B, L, D) -> (B, L, D)."""
  dt = delta.astype(jnp.float32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(jnp.float32)
  return jax.nn.softplus(dt) if softplus else dt


def gated_output(y, u, D, z, dtype):
  """out = (y + D u) ⊙ SiLU(z), computed in float32, returned in `dtype`; all (B, L, D)."""
  y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y.astype(dtype)


def _scan_reference(u, dt, A, B, C):
  """Sequential `lax.scan` over time; returns C·h (B, L, D) in float32."""
  A = A.astype(jnp.float32)

  def step(h, xs):  # h: (B, D, N)
    u_t, dt_t, b_t, c_t = xs  # (B, D), (B, D), (B, N), (B, N)
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_t)

  batch, _, channels = u.shape
  h0 = jnp.zeros((batch, channels, A.shape[1]), jnp.float32)
  xs = (u.astype(jnp.float32), dt, B.astype(jnp.float32), C.astype(jnp.float32))
  xs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs)  # time first
  _, y = jax.lax.scan(step, h0, xs)
  return jnp.swapaxes(y, 0, 1)


def _affine_combine(left, right):
  """Composition of h -> a h + b maps, `left` applied first: (a_r a_l, a_r b_l + b_r)."""
  a_l, b_l = left
  a_r, b_r = right
  return a_r * a_l, a_r * b_l + b_r


def _scan_chunk(u, dt, A, B, C, h0=None):
  """Associative scan over axis 1 of a block of time; returns (C·h (B, T, D), last h (B, D, N))."""
  decay = jnp.exp(dt[..., None] * A.astype(jnp.float32))  # (B, T, D, N)
  drive = (dt * u.astype(jnp.float32))[..., None] * B.astype(jnp.float32)[:, :, None, :]
  decay, h = jax.lax.associative_scan(_affine_combine, (decay, drive), axis=1)
  if h0 is not None:
    h = h + decay * h0[:, None]  # the carried state, decayed by the cumulative product
  y = jnp.einsum("btdn,btn->btd", h, C.astype(jnp.float32))
  return y, h[:, -1]


def _scan_associative(u, dt, A, B, C):
  return _scan_chunk(u, dt, A, B, C)[0]


def _scan_chunked(u, dt, A, B, C, chunk_size):
  """`lax.scan` over chunks of `chunk_size` steps carrying h; each chunk body is rematerialised.

  Memory kept for the gradient: the inputs plus one (B, D, N) state per chunk. A length that is not
  a multiple of the chunk is padded at the end with Δ = 0 (decay 1, drive 0), which leaves every
  real step's state untouched; the padded outputs are dropped.
  """
  batch, length, channels = u.shape
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length

  def to_chunks(x):  # (B, L, ...) -> (num_chunks, B, chunk, ...)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  @jax.checkpoint
  def body(h, xs):
    u_c, dt_c, b_c, c_c = xs
    y, h = _scan_chunk(u_c, dt_c, A, b_c, c_c, h)
    return h, y

  h0 = jnp.zeros((batch, channels, A.shape[1]), jnp.float32)
  _, y = jax.lax.scan(body, h0, tuple(to_chunks(x) for x in (u, dt, B, C)))
  y = jnp.swapaxes(y, 0, 1).reshape(batch, num_chunks * chunk_size, channels)
  return y[:, :length]


def _auto_impl() -> str:
  """Fastest correct impl for the default backend (measured: see `.notes/scan.md`).

  CPU: the sequential scan wins on compile and run time alike (B=8, L=366, D=128, N=16: 10 / 88 ms
  fwd / fwd+bwd against 32 / 115 ms for the best chunked and 65 / 173 ms associative).
  GPU: the lanes kernel (H200, 2026-11-29: fwd / fwd+bwd 0.68 / 2.68 ms at L=366, D=3072, batch 64
  and 0.48 / 1.75 ms at L=9216, batch 1, against 4.1 / 15.1 and 3.0 / 8.9 for v1, which was
  already faster than chunked, with ~50x less memory than associative; benchmarks/RESULTS.md).
  TPU: chunked; the kernel runs there only in interpret mode so far (not measured on a TPU).
  """
  backend = jax.default_backend()
  if backend == "cpu":
    return "reference"
  return "pallas_lanes" if backend == "gpu" else "chunked"


def selective_scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array,
  *,
  delta_bias: jax.Array | None = None,
  delta_softplus: bool = True,
  z: jax.Array | None = None,
  impl: str = "associative",
  chunk_size: int | None = None,
) -> jax.Array:
  """Mamba-1 selective scan; see the module docstring for the equations.

  Args:
    u: input, (batch, length, channels).
    delta: pre-activation step size δ, (batch, length, channels).
    A: state matrix (negative for a stable scan), (channels, state).
    B, C: input and output projections, (batch, length, state).
    D: skip weight, (channels,).
    delta_bias: added to δ before the softplus, (channels,).
    delta_softplus: apply softplus to δ + bias.
    z: gate, (batch, length, channels); the output is multiplied by SiLU(z).
    impl: one of `IMPLS`.
    chunk_size: time steps per chunk for "chunked" (default 256) and the kernels (their own
      defaults: `scan_pallas_lanes.DEFAULTS`, `scan_pallas.DEFAULT_CHUNK`).

  Returns:
    (batch, length, channels) in u's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"selective_scan impl={impl!r} is unknown; use one of {', '.join(IMPLS)}.")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"selective_scan chunk_size={chunk_size!r}: use a positive integer.")
  if impl == "auto":
    impl = _auto_impl()
  if impl in ("pallas", "pallas_lanes"):
    # Imported lazily: Pallas stays off the XLA-only path.
    from dim_jax.ops import scan_pallas, scan_pallas_lanes

    kernel = dict(
      pallas=scan_pallas.selective_scan_pallas,
      pallas_lanes=scan_pallas_lanes.selective_scan_pallas_lanes,
    )[impl]

    def fused(u, delta, B, C, z, A, D, delta_bias):
      return kernel(u, delta, A, B, C, D, delta_bias, delta_softplus, z, chunk_size)

    # Under a mesh, each device runs the kernel on its own rows of the batch.
    return parallel.map_batch_shards(fused, (u, delta, B, C, z), (A, D, delta_bias))
  dt = discretised_delta(delta, delta_bias, delta_softplus)  # (B, L, D) float32
  scans: dict[str, Callable] = {
    "reference": _scan_reference,
    "associative": _scan_associative,
    "chunked": lambda *a: _scan_chunked(*a, chunk_size or 256),
  }
  y = scans[impl](u, dt, A, B, C)  # (B, L, D) float32
  return gated_output(y, u, D, z, u.dtype)
