"""`impl="pallas_tpu"` of `selective_scan`: a Pallas TPU (Mosaic) kernel, forward and backward.

Laid out for the TPU's (8 sublanes x 128 lanes) vector registers, not ported from the GPU kernels:

  channels   on the lanes: each program owns `block_d` channels (a multiple of 128);
  states     on the sublanes: the state h is an (N, block_d) float32 array (N = 16: two sublane
             tiles), kept in VMEM scratch from one time chunk to the next;
  time       in chunks of `chunk` steps (a multiple of 8) staged through VMEM by the Pallas
             pipeline (the next chunk's DMA overlaps this chunk's work); inside a chunk a
             `fori_loop` walks the steps one (1, block_d) row at a time.

Grid (batch, channel blocks, time chunks): the first two axes "parallel" (split over the two
TensorCores of a v4 / v5p megacore chip), time "arbitrary" (sequential, carrying h).

B and C enter as (batch, chunks, N, chunk), one (N, chunk) tile per chunk with time on the lanes:
the step-t column (N, 1) is picked out by a masked lane sum and broadcast over the channels, so
the kernel needs no in-register transpose. Per chunk, Δ = softplus(δ + bias), Δ·u, the skip term
and the gate are computed for the whole (chunk, block_d) tile at once; only exp(Δ A), the
state update and C·h run per step. Everything of size (L, D, N) stays in VMEM.

Backward (custom VJP): the forward keeps the float32 state entering each chunk, (B, chunks, N, D);
the backward walks the chunks in reverse, recomputes the chunk's states and decays from the kept
state into VMEM scratch ((chunk + 1, N, block_d) and (chunk, N, block_d)), then runs the adjoint
recurrence backwards over them. It writes du, dδ, dz per row, dB, dC per channel block (summed in
XLA), and accumulates dA, dD, dbias per (sample, channel block) over the time chunks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dim_jax.ops.scan.config import ScanConfig
from dim_jax.ops.scan.xla import pad_to

F32 = jnp.float32
LANES = 128
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
SUBLANES = 8
DEFAULT_CHUNK = 128  # steps per grid step: a (128, 256) float32 row tile is 128 KiB of VMEM
DEFAULT_BLOCK_D = 256  # channels per program: two lane tiles; the (16, 256) state is 4 vregs
# VMEM per TensorCore (jax's tpu_info): 16 MiB on v4, 128 MiB on v5e and v6e, 64 MiB on v5p and
# v7. The kernels ask for what their blocks and scratch need plus headroom, and refuse settings
# that need more than the smallest of these.
# Steps per loop body on a TPU: the exps and column picks of later steps do not wait on the state,
# so an unrolled body lets the scheduler overlap them with the recurrence (chunks are multiples of
# 8). The interpreter runs the same loop rolled (unrolling changes no result, only compile time).
UNROLL = SUBLANES
VMEM_CAPACITY = 16 * 1024 * 1024
VMEM_HEADROOM = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters."""

  block_d: int  # channels per program, a multiple of 128
  chunk: int  # time steps per grid step, a multiple of 8
  softplus: bool
  interpret: bool | None  # None: the Mosaic kernel when lowering for TPU, else the interpreter


def _softplus(x):
  """log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, and e^x to full precision for x << 0."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def _step_column(tile, lane, t):
  """Column t of an (N, chunk) tile as (N, 1): a masked lane sum (exact: one non-zero term)."""
  return jnp.sum(jnp.where(lane == t, tile, 0.0), axis=1, keepdims=True)


def _chunk_inputs(u_ref, delta_ref, bias_ref, softplus):
  """Δ and Δ·u of the whole (chunk, block_d) tile, float32."""
  u = u_ref[...].astype(F32)
  dt = delta_ref[...].astype(F32) + bias_ref[...]
  if softplus:
    dt = _softplus(dt)
  return u, dt


def _forward_kernel(*refs, chunk, unroll, softplus, has_z, keep_states):
  """One (sample, channel block, time chunk): y for the chunk; the state entering it if kept."""
  u_ref, delta_ref, *rest = refs
  z_ref = rest.pop(0) if has_z else None
  b_ref, c_ref, a_ref, d_ref, bias_ref, y_ref, *rest = rest
  states_ref = rest.pop(0) if keep_states else None
  h_ref, dt_s, x_s, y_s = rest

  @pl.when(pl.program_id(2) == 0)
  def _():
    h_ref[...] = jnp.zeros_like(h_ref)

  if keep_states:
    states_ref[...] = h_ref[...]
  u, dt = _chunk_inputs(u_ref, delta_ref, bias_ref, softplus)
  dt_s[...] = dt
  x_s[...] = dt * u
  a2 = a_ref[...]  # (N, block_d) float32: A·log2 e
  b_tile, c_tile = b_ref[...], c_ref[...]  # (N, chunk) float32
  lane = jax.lax.broadcasted_iota(jnp.int32, b_tile.shape, 1)

  def step(t, h):  # h: (N, block_d)
    dt_t = dt_s[pl.ds(t, 1), :]  # (1, block_d)
    b_t, c_t = _step_column(b_tile, lane, t), _step_column(c_tile, lane, t)  # (N, 1)
    h = jnp.exp2(dt_t * a2) * h + b_t * x_s[pl.ds(t, 1), :]
    y_s[pl.ds(t, 1), :] = jnp.sum(h * c_t, axis=0, keepdims=True)
    return h

  h_ref[...] = jax.lax.fori_loop(0, chunk, step, h_ref[...], unroll=unroll)
  y = y_s[...] + u * d_ref[...]
  if has_z:
    z = z_ref[...].astype(F32)
    y = y * (z * _sigmoid(z))
  y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(*refs, chunk, unroll, softplus, has_z):
  """One (sample, channel block, time chunk), chunks visited last to first."""
  u_ref, delta_ref, *rest = refs
  z_ref = rest.pop(0) if has_z else None
  g_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, start_ref, du_ref, ddelta_ref, *rest = rest
  dz_ref = rest.pop(0) if has_z else None
  db_ref, dc_ref, da_ref, dd_ref, dbias_ref, *rest = rest
  dh_ref, hs, decays, dt_s, x_s, gy_s, y_s, s_s, ddt_s = rest

  @pl.when(pl.program_id(2) == 0)
  def _():
    dh_ref[...] = jnp.zeros_like(dh_ref)
    da_ref[...] = jnp.zeros_like(da_ref)
    dd_ref[...] = jnp.zeros_like(dd_ref)
    dbias_ref[...] = jnp.zeros_like(dbias_ref)

  u, dt = _chunk_inputs(u_ref, delta_ref, bias_ref, softplus)
  dt_s[...] = dt
  x_s[...] = dt * u
  g = g_ref[...].astype(F32)
  if has_z:
    z = z_ref[...].astype(F32)
    sig = _sigmoid(z)
    gy_s[...] = g * (z * sig)
  else:
    gy_s[...] = g
  a2 = a_ref[...]
  b_tile, c_tile = b_ref[...], c_ref[...]
  lane = jax.lax.broadcasted_iota(jnp.int32, b_tile.shape, 1)

  # Recompute the chunk from its kept start state: hs[t + 1] = h_t, decays[t] = exp(Δ_t A).
  hs[0] = start_ref[...]

  def forward_step(t, h):
    dt_t = dt_s[pl.ds(t, 1), :]
    decay = jnp.exp2(dt_t * a2)
    h = decay * h + _step_column(b_tile, lane, t) * x_s[pl.ds(t, 1), :]
    decays[t] = decay
    hs[t + 1] = h
    y_s[pl.ds(t, 1), :] = jnp.sum(h * _step_column(c_tile, lane, t), axis=0, keepdims=True)
    return h

  jax.lax.fori_loop(0, chunk, forward_step, hs[0], unroll=unroll)

  # Adjoint, t = chunk - 1 .. 0; dh is d loss / d h_t, carried to h_{t-1} through the decay.
  def backward_step(i, carry):
    dh, da, db_tile, dc_tile = carry
    t = chunk - 1 - i
    dt_t, x_t, gy_t = dt_s[pl.ds(t, 1), :], x_s[pl.ds(t, 1), :], gy_s[pl.ds(t, 1), :]
    h_t, decay = hs[t + 1], decays[t]
    b_t, c_t = _step_column(b_tile, lane, t), _step_column(c_tile, lane, t)
    dh = dh + c_t * gy_t  # y_t = C_t · h_t
    at_t = lane == t
    dc_tile = jnp.where(at_t, jnp.sum(h_t * gy_t, axis=1, keepdims=True), dc_tile)
    db_tile = jnp.where(at_t, jnp.sum(dh * x_t, axis=1, keepdims=True), db_tile)
    s = jnp.sum(dh * b_t, axis=0, keepdims=True)  # (1, block_d): d loss / d(Δ_t u_t)
    d_log_decay = dh * hs[t] * decay  # d loss / d(Δ_t A)
    da = da + d_log_decay * dt_t
    s_s[pl.ds(t, 1), :] = s
    ddt_s[pl.ds(t, 1), :] = jnp.sum(d_log_decay * a2, axis=0, keepdims=True)
    return dh * decay, da, db_tile, dc_tile

  zeros_tile = jnp.zeros_like(b_tile)
  carry = (dh_ref[...], jnp.zeros_like(a2), zeros_tile, zeros_tile)
  dh, da, db_tile, dc_tile = jax.lax.fori_loop(0, chunk, backward_step, carry, unroll=unroll)
  dh_ref[...] = dh
  da_ref[...] += da
  db_ref[...] = db_tile
  dc_ref[...] = dc_tile

  gy, s = gy_s[...], s_s[...]
  d_skip = d_ref[...]
  du_ref[...] = (dt * s + gy * d_skip).astype(du_ref.dtype)
  d_dt = ddt_s[...] * LN_2 + u * s  # Σ_n d_log_decay · A = ln 2 Σ_n d_log_decay · A log2 e
  if softplus:
    d_dt = d_dt * _sigmoid(delta_ref[...].astype(F32) + bias_ref[...])
  ddelta_ref[...] = d_dt.astype(ddelta_ref.dtype)
  dbias_ref[...] += jnp.sum(d_dt, axis=0, keepdims=True)
  dd_ref[...] += jnp.sum(gy * u, axis=0, keepdims=True)
  if has_z:
    y = y_s[...] + u * d_skip
    dz_ref[...] = (g * y * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)


def _specs(cfg, num_chunks, state, backward=False):
  """Blocks of one program of grid (sample b, channel block j, step k); the backward visits
  chunk num_chunks - 1 - k."""
  bd, t = cfg.block_d, cfg.chunk

  def chunk_of(k):
    return num_chunks - 1 - k if backward else k

  return dict(
    rows=pl.BlockSpec((None, t, bd), lambda b, j, k: (b, chunk_of(k), j)),  # (B, L, D)
    tile=pl.BlockSpec((None, None, state, t), lambda b, j, k: (b, chunk_of(k), 0, 0)),
    param=pl.BlockSpec((state, bd), lambda b, j, k: (0, j)),  # Aᵀ log2 e: (N, D)
    vec=pl.BlockSpec((1, bd), lambda b, j, k: (0, j)),  # D, bias: (1, D)
    state=pl.BlockSpec((None, None, state, bd), lambda b, j, k: (b, chunk_of(k), 0, j)),
    # per channel block: dBᵀ, dCᵀ tiles, (B, blocks, chunks, N, chunk)
    block_tile=pl.BlockSpec(
      (None, None, None, state, t), lambda b, j, k: (b, j, chunk_of(k), 0, 0)
    ),
    per_sample_param=pl.BlockSpec((None, state, bd), lambda b, j, k: (b, 0, j)),  # (B, N, D)
    per_sample_vec=pl.BlockSpec((None, 1, bd), lambda b, j, k: (b, 0, j)),  # (B, 1, D)
  )


def vmem_bytes(cfg: KernelConfig, state: int, itemsize: int, backward: bool) -> int:
  """VMEM one program uses: its double-buffered blocks plus its scratch."""
  bd, t = cfg.block_d, cfg.chunk
  row, row32, tile, param = t * bd * itemsize, t * bd * 4, state * max(t, LANES) * 4, state * bd * 4
  if not backward:  # u, δ, z, y blocks; B, C tiles; A, states; scratch h + Δ, Δu, y rows
    return 2 * (4 * row + 2 * tile + 2 * param) + param + 3 * row32
  blocks = 2 * (7 * row + 4 * tile + 3 * param)  # u, δ, z, g, du, dδ, dz; B, C, dB, dC; A, h0, dA
  scratch = param + (2 * t + 1) * param + 6 * row32  # dh; states and decays; six row buffers
  return blocks + scratch


def _compiler_params(cfg, need):
  if need > VMEM_CAPACITY - VMEM_HEADROOM:
    raise ValueError(
      f"pallas_tpu block_d={cfg.block_d}, chunk={cfg.chunk} need {need / 2**20:.1f} MiB of VMEM "
      f"per program, more than the {VMEM_CAPACITY // 2**20} MiB of a v4 core less headroom; "
      "use a smaller block_d or model.scan.chunk."
    )
  return pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "arbitrary"),
    vmem_limit_bytes=need + VMEM_HEADROOM,
  )


def _call(cfg, kernel, ins, need, name, **call):
  """`pl.pallas_call(kernel, **call)(*ins)`: compiled by Mosaic on TPU, run by the Pallas
  interpreter elsewhere. Unless the config forces one, the choice is made when lowering
  (`platform_dependent`), so that lowering for TPU on a CPU host gives the Mosaic kernel."""

  def build(interpret):
    return pl.pallas_call(
      functools.partial(kernel, unroll=1 if interpret else UNROLL),
      compiler_params=None if interpret else _compiler_params(cfg, need),
      interpret=interpret,
      name=name,
      **call,
    )

  if cfg.interpret is not None:
    return build(cfg.interpret)(*ins)
  return jax.lax.platform_dependent(*ins, tpu=build(False), default=build(True))


def _forward(cfg, u, delta, bt, ct, a2, d, bias, z, keep_states=True):
  batch, length, channels = u.shape
  state, num_chunks = a2.shape[0], length // cfg.chunk
  s = _specs(cfg, num_chunks, state)
  has_z = z is not None
  ins = (u, delta, *((z,) if has_z else ()), bt, ct, a2, d, bias)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  in_specs += [s["tile"], s["tile"], s["param"], s["vec"], s["vec"]]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype)]
  out_specs = [s["rows"]]
  if keep_states:
    out_shape.append(jax.ShapeDtypeStruct((batch, num_chunks, state, channels), F32))
    out_specs.append(s["state"])
  bd, t = cfg.block_d, cfg.chunk
  need = vmem_bytes(cfg, state, u.dtype.itemsize, backward=False)
  kernel = functools.partial(
    _forward_kernel, chunk=t, softplus=cfg.softplus, has_z=has_z, keep_states=keep_states
  )  # fmt: skip
  outs = _call(
    cfg, kernel, ins, need, "selective_scan_tpu_fwd",
    out_shape=tuple(out_shape),
    grid=(batch, channels // bd, num_chunks),
    in_specs=in_specs,
    out_specs=tuple(out_specs),
    scratch_shapes=[pltpu.VMEM((state, bd), F32)] + [pltpu.VMEM((t, bd), F32)] * 3,
  )  # fmt: skip
  return outs if keep_states else (outs[0], None)


def _backward(cfg, res, g):
  u, delta, bt, ct, a2, d, bias, z, states = res
  batch, length, channels = u.shape
  state, num_chunks = a2.shape[0], length // cfg.chunk
  bd, t = cfg.block_d, cfg.chunk
  num_blocks = channels // bd
  s = _specs(cfg, num_chunks, state, backward=True)
  has_z = z is not None
  ins = (u, delta, *((z,) if has_z else ()), g, bt, ct, a2, d, bias, states)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ()), s["rows"]]
  in_specs += [s["tile"], s["tile"], s["param"], s["vec"], s["vec"], s["state"]]
  tiles = jax.ShapeDtypeStruct((batch, num_blocks, num_chunks, state, t), F32)
  out_shape = (
    jax.ShapeDtypeStruct(u.shape, u.dtype),
    jax.ShapeDtypeStruct(delta.shape, delta.dtype),
    *((jax.ShapeDtypeStruct(z.shape, z.dtype),) if has_z else ()),
    tiles,  # dBᵀ per channel block
    tiles,  # dCᵀ per channel block
    jax.ShapeDtypeStruct((batch, state, channels), F32),  # d(Aᵀ log2 e) / ln 2 per sample
    jax.ShapeDtypeStruct((batch, 1, channels), F32),  # dD per sample
    jax.ShapeDtypeStruct((batch, 1, channels), F32),  # dbias per sample
  )
  out_specs = (
    s["rows"], s["rows"], *((s["rows"],) if has_z else ()), s["block_tile"], s["block_tile"],
    s["per_sample_param"], s["per_sample_vec"], s["per_sample_vec"],
  )  # fmt: skip
  scratch = [
    pltpu.VMEM((state, bd), F32),  # dh carried across chunks
    pltpu.VMEM((t + 1, state, bd), F32),  # the chunk's states, its start state first
    pltpu.VMEM((t, state, bd), F32),  # its decays
    *[pltpu.VMEM((t, bd), F32)] * 6,  # Δ, Δu, d loss/dy, C·h, d loss/d(Δu), d loss/dΔ rows
  ]
  need = vmem_bytes(cfg, state, u.dtype.itemsize, backward=True)
  kernel = functools.partial(_backward_kernel, chunk=t, softplus=cfg.softplus, has_z=has_z)
  outs = _call(
    cfg, kernel, ins, need, "selective_scan_tpu_bwd",
    out_shape=out_shape,
    grid=(batch, num_blocks, num_chunks),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=scratch,
  )  # fmt: skip
  du, d_delta = outs[:2]
  dz = outs[2] if has_z else None
  d_bt, d_ct, d_a2, d_d, d_bias = outs[-5:]
  return (
    du,
    d_delta,
    jnp.sum(d_bt, axis=1),  # over channel blocks: (B, chunks, N, chunk)
    jnp.sum(d_ct, axis=1),
    jnp.sum(d_a2, axis=0) * LN_2,  # d loss / d(A log2 e) = ln 2 · d loss / dA
    jnp.sum(d_d, axis=0).astype(d.dtype),
    jnp.sum(d_bias, axis=0).astype(bias.dtype),
    dz,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scan(cfg, u, delta, bt, ct, a2, d, bias, z):
  return _forward(cfg, u, delta, bt, ct, a2, d, bias, z, keep_states=False)[0]


def _fused_scan_fwd(cfg, u, delta, bt, ct, a2, d, bias, z):
  y, states = _forward(cfg, u, delta, bt, ct, a2, d, bias, z)
  return y, (u, delta, bt, ct, a2, d, bias, z, states)


_fused_scan.defvjp(_fused_scan_fwd, _backward)


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def selective_scan(
  u, delta, A, B, C, D, delta_bias, delta_softplus, z, config: ScanConfig, *, block_d=None,
  interpret=None,
):  # fmt: skip
  """Fused selective scan on TPU; same arguments and result as `dim_jax.ops.selective_scan`.

  `config.chunk` steps per chunk (0: DEFAULT_CHUNK). `block_d` (channels per program, default
  DEFAULT_BLOCK_D) and `interpret` (default: Mosaic when lowering for TPU, else the interpreter)
  are for tests and tuning. Padding, sliced off at the end: channels with zeros to a multiple of
  block_d (A = 0, u = 0: those channels stay 0), the length with zeros to whole chunks (after the
  last real step: causal, and the backward's cotangent is 0 there). A sequence shorter than the
  chunk is one chunk of its length rounded up to 8.
  """
  batch, length, channels = u.shape
  state = A.shape[1]
  block_d = block_d or DEFAULT_BLOCK_D
  chunk = min(config.chunk or DEFAULT_CHUNK, _round_up(length, SUBLANES))
  if block_d % LANES or chunk % SUBLANES:
    raise ValueError(
      f"model.scan.chunk={chunk} (block_d={block_d}) for pallas_tpu: use a multiple of "
      f"{SUBLANES} steps ({LANES} channels), the TPU's (8, 128) register tile."
    )
  cfg = KernelConfig(block_d=block_d, chunk=chunk, softplus=delta_softplus, interpret=interpret)
  padded_d, padded_l = _round_up(channels, block_d), _round_up(length, chunk)
  if delta_bias is None:
    delta_bias = jnp.zeros((channels,), F32)
  u, delta, z = (pad_to(pad_to(x, 2, padded_d), 1, padded_l) for x in (u, delta, z))
  num_chunks = padded_l // chunk

  def tiles(x):  # (B, L, N) -> (B, chunks, N, chunk) float32: time on the lanes
    x = pad_to(x.astype(F32), 1, padded_l).reshape(batch, num_chunks, chunk, state)
    return jnp.swapaxes(x, 2, 3)

  # (N, D); exp(Δ A) = exp2(Δ A log2 e), one multiply less per (t, d, n) on the VPU
  a2 = pad_to(A.astype(F32).T * LOG2_E, 1, padded_d)
  d, bias = (pad_to(x.astype(F32), 0, padded_d)[None] for x in (D, delta_bias))  # (1, D)
  y = _fused_scan(cfg, u, delta, tiles(B), tiles(C), a2, d, bias, z)
  return y[:, :length, :channels]
