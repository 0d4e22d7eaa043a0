"""The selective scan in plain XLA: the sequential reference, the associative and the chunked scan.

Each takes Δ already discretised (float32) and returns C·h, (B, L, D) float32; `selective_scan`
adds the skip and the gate (`gated_output`).
"""

import jax
import jax.numpy as jnp

from dim_jax.ops.scan.config import ScanConfig

DEFAULT_CHUNK = 256  # steps per chunk of "chunked": one (B, chunk, D, N) block live at a time


def pad_to(x: jax.Array | None, axis: int, size: int) -> jax.Array | None:
  """x zero-padded at the end of `axis` to `size` (None stays None): the kernels' block shapes."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


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


def reference(u, dt, A, B, C, config: ScanConfig):
  """Sequential `lax.scan` over time: the oracle; its gradient keeps every (B, D, N) state."""
  del config
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


def _scan_block(u, dt, A, B, C, h0=None):
  """Associative scan over axis 1 of a block of time; returns (C·h (B, T, D), last h (B, D, N))."""
  decay = jnp.exp(dt[..., None] * A.astype(jnp.float32))  # (B, T, D, N)
  drive = (dt * u.astype(jnp.float32))[..., None] * B.astype(jnp.float32)[:, :, None, :]
  decay, h = jax.lax.associative_scan(_affine_combine, (decay, drive), axis=1)
  if h0 is not None:
    h = h + decay * h0[:, None]  # the carried state, decayed by the cumulative product
  y = jnp.einsum("btdn,btn->btd", h, C.astype(jnp.float32))
  return y, h[:, -1]


def associative(u, dt, A, B, C, config: ScanConfig):
  """`lax.associative_scan` over (B, L, D, N) pairs: parallel in time, but it materialises them."""
  del config
  return _scan_block(u, dt, A, B, C)[0]


def chunked(u, dt, A, B, C, config: ScanConfig):
  """`lax.scan` over chunks of `config.chunk` steps carrying h; each chunk body is rematerialised.

  Memory kept for the gradient: the inputs plus one (B, D, N) state per chunk. A length that is not
  a multiple of the chunk is padded at the end with Δ = 0 (decay 1, drive 0), which leaves every
  real step's state untouched; the padded outputs are dropped.
  """
  chunk = config.chunk or DEFAULT_CHUNK
  batch, length, channels = u.shape
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def to_chunks(x):  # (B, L, ...) -> (num_chunks, B, chunk, ...)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, num_chunks, chunk, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  @jax.checkpoint
  def body(h, xs):
    u_c, dt_c, b_c, c_c = xs
    y, h = _scan_block(u_c, dt_c, A, b_c, c_c, h)
    return h, y

  h0 = jnp.zeros((batch, channels, A.shape[1]), jnp.float32)
  _, y = jax.lax.scan(body, h0, tuple(to_chunks(x) for x in (u, dt, B, C)))
  y = jnp.swapaxes(y, 0, 1).reshape(batch, num_chunks * chunk, channels)
  return y[:, :length]
