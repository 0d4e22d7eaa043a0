"""`impl="pallas_lanes"` of `selective_scan`: the lanes = channels kernels of
`scan_pallas_lanes_kernels.py` behind a `jax.custom_vjp`, with the sequence split and the padding.

Sequence split (`segments` S > 1): batch 1 at D = 3072 gives only D/32 = 96 single-warp programs,
too few for a GPU, so the sequence is cut into S segments of L_s steps, S times the programs:
  1. `segment_end_kernel`: each segment from a zero state -> its end state e_s and ΣΔ over it
     (its total decay P_s = exp(A ΣΔ_s), one exp per (d, n) per segment);
  2. in XLA, S - 1 sequential steps over (B, N, D) arrays: h_0 = 0, h_{s+1} = P_s h_s + e_s;
  3. `forward_kernel`: each segment again from its true start state h_s, writing y.
The backward does the same in reverse with adjoints (`segment_adjoint_kernel`, then the combine
dh_s = a_{s+1} + P_{s+1} dh_{s+1}, then `backward_kernel`). It costs twice the exps of the
single pass. With S > 1 the length is padded to S·L_s (L_s a multiple of the chunk) with zero
inputs at the end: causal, so the real steps are unchanged.

Kept for the backward: the inputs, one float32 (N, D) state per chunk and sample, and ΣΔ per
segment: O(B·L·D + B·(L/chunk)·D·N).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dim_jax.ops import scan_pallas_kernels as v1
from dim_jax.ops import scan_pallas_lanes_kernels as kernels
from dim_jax.ops.scan_pallas import kernel_cotangents, pad_axis

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters: channels and warps per program (GPU), steps per chunk, segments."""

  block_d: int  # 32 x num_warps x k: each lane owns k channels
  fwd_block_d: int  # the forward kernels' block_d (no channel sums there: k = 2 pays)
  num_warps: int
  chunk: int
  fwd_chunk: int  # the forward kernels' chunk: a divisor of chunk x save_every
  segments: int
  save_every: int  # chunks per state kept for the backward (> 1: recomputed there, less memory)
  prefetch: bool  # forward loads chunk c + 1 while computing chunk c
  fast_exp: bool  # exponentials as ex2.approx.ftz (GPU only)
  lane_reduce: bool  # backward dB, dC through one warp butterfly per step (one channel per lane)
  fast_act: bool  # softplus, sigmoid from ex2 / lg2 / rcp
  softplus: bool
  interpret: bool

  @property
  def kernel_fast_exp(self):
    return self.fast_exp and not self.interpret

  def forward(self):
    """The launch parameters of the forward kernels: they save a state every chunk x save_every
    steps as well, in chunks of their own."""
    every = self.chunk * self.save_every // self.fwd_chunk
    return dataclasses.replace(
      self, block_d=self.fwd_block_d, chunk=self.fwd_chunk, save_every=every
    )  # fmt: skip

  @property
  def kernel_lane_reduce(self):
    return self.lane_reduce and self.block_d == kernels.LANES * self.num_warps


DEFAULTS = dict(
  block_d=32,
  num_warps=1,
  # The forward waits on its loads once per chunk (ncu: over half of its stalls were L1TEX
  # waits). H200, 2026-11-29: fwd+bwd 2.68 ms with 4 steps against 3.95 with 2 at L=366, batch
  # 64; 1.75 against 1.76 at 9216 x 1 (32 segments), whose forward gains most (0.48 vs 0.60).
  chunk=4,
  segments=1,
  save_every=1,
  prefetch=True,
  fast_exp=True,
  lane_reduce=True,
  fast_act=True,
)
# An H200 has 132 SMs: below this many single-warp programs, split the sequence. Measured at
# L=9216, D=3072, batch 1, chunk 2 (benchmarks/RESULTS.md): fwd / fwd+bwd 1.60 / 3.62 ms with 8
# segments, 0.97 / 2.68 ms with 16, 0.85 / 2.21 ms with 32; at L=366, batch 64 (6144 programs):
# 1 segment. 4494 x 4 (384 programs), 2026-11-29: 1.45 / 3.84 ms split (chunk 2), 1.81 / 4.90
# unsplit (chunk 4).
MIN_PROGRAMS = 4 * 132
SPLIT_SEGMENTS = 32
MIN_SEGMENT_STEPS = 128  # shorter segments: the second pass of exps would not pay


def default_fwd_block_d(
  batch: int, channels: int, block_d: int, num_warps: int, segments: int
) -> int:  # fmt: skip
  """Two channels per lane in the forward when that still gives MIN_PROGRAMS programs (measured
  at L=366, D=3072, batch 64, 1 warp: forward 1.23 ms with block_d 64 against 1.37-1.40 with 32,
  which the backward needs for its warp butterfly)."""
  wide = max(block_d, 2 * kernels.LANES * num_warps)
  if segments == 1 and batch * -(-channels // wide) >= MIN_PROGRAMS:
    return wide
  return block_d


def default_segments(batch: int, length: int, channels: int, block_d: int) -> int:
  """Sequence segments: 1 when batch x channel blocks fill the GPU, else 32 if each segment keeps
  at least MIN_SEGMENT_STEPS steps (the split costs a second pass of exps, worth it only for long
  sequences)."""
  programs = batch * -(-channels // block_d)
  if programs >= MIN_PROGRAMS or length < SPLIT_SEGMENTS * MIN_SEGMENT_STEPS:
    return 1
  return SPLIT_SEGMENTS


def _compiler_params(cfg):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as pltriton

  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _specs(seg_len, state, cfg):
  """Blocks of one program of grid (batch b, segment s, channel block j)."""
  bd, nc = cfg.block_d, _saved_states(seg_len, cfg)
  return dict(
    rows=pl.BlockSpec((None, seg_len, bd), lambda b, s, j: (b, s, j)),  # (B, L, D)
    state_rows=pl.BlockSpec((None, seg_len * state), lambda b, s, j: (b, s)),  # B, C: (B, L·N)
    param=pl.BlockSpec((state, bd), lambda b, s, j: (0, j)),  # Aᵀ: (N, D)
    vec=pl.BlockSpec((bd,), lambda b, s, j: (j,)),  # D, bias: (D,)
    seg_state=pl.BlockSpec((None, None, state, bd), lambda b, s, j: (b, s, 0, j)),  # (B, S, N, D)
    seg_vec=pl.BlockSpec((None, None, bd), lambda b, s, j: (b, s, j)),  # (B, S, D)
    chunk_states=pl.BlockSpec((None, nc, state, bd), lambda b, s, j: (b, s, 0, j)),
    group_starts=pl.BlockSpec(
      (None, None, cfg.save_every, state, bd), lambda b, s, j: (b, s, 0, 0, j)
    ),  # (B, S, save_every, N, D): one program's scratch rows
    # Per channel block: [dB | dC] sums, (B, blocks, L, 2N) or, lane-reduced, (B, blocks, L, G, bd).
    channel_sums=pl.BlockSpec((None, None, seg_len, 2 * state), lambda b, s, j: (b, j, s, 0)),
    lane_sums=pl.BlockSpec(
      (None, None, seg_len, _lane_groups(state), bd), lambda b, s, j: (b, j, s, 0, 0)
    ),
  )


def _saved_states(seg_len, cfg):
  """States the forward keeps per segment: one per chunk, or one per group of save_every chunks
  (the segment is then padded to whole groups)."""
  if cfg.save_every == 1:
    return -(-seg_len // cfg.chunk)
  return seg_len // (cfg.save_every * cfg.chunk)


def _lane_groups(state):
  """Rows of 32 sums that hold a step's 2N channel sums of dB and dC (zero-padded)."""
  return -(-2 * state // kernels.LANES)


def _split_channel_sums(sums, state, lane_reduce):
  """The backward's channel sums -> partial dB, dC per channel block, (B, blocks, L, N) each."""
  if lane_reduce:  # (B, blocks, L, G, bd): lane l of warp w holds warp w's sum of value 32·g + l
    batch, blocks, length, groups, bd = sums.shape
    sums = sums.reshape(batch, blocks, length, groups, bd // kernels.LANES, kernels.LANES)
    sums = jnp.sum(sums, axis=4).reshape(batch, blocks, length, groups * kernels.LANES)
  return sums[..., :state], sums[..., state : 2 * state]


def _call(cfg, kernel, name, ins, in_specs, out_shape, out_specs, grid, **static):
  return pl.pallas_call(
    functools.partial(
      kernel,
      chunk=cfg.chunk,
      softplus=cfg.softplus,
      fast_exp=cfg.kernel_fast_exp,
      native=not cfg.interpret,
      fast_act=cfg.fast_act,
      **static,
    ),  # fmt: skip
    out_shape=out_shape,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    compiler_params=_compiler_params(cfg),
    interpret=cfg.interpret,
    name=name,
  )(*ins)


def _segment_starts(cfg, u, delta, a2, B, bias):
  """True state entering each segment, (B, S, N, D), and ΣΔ per segment, (B, S, D)."""
  batch, length, channels = u.shape
  seg_len, state = length // cfg.segments, a2.shape[0]
  grid = (batch, cfg.segments, channels // cfg.block_d)
  s = _specs(seg_len, state, cfg)
  ends, dt_sum = _call(
    cfg, kernels.segment_end_kernel, "selective_scan_lanes_ends",
    (u, delta, B, a2, bias), [s["rows"], s["rows"], s["state_rows"], s["param"], s["vec"]],
    (jax.ShapeDtypeStruct((batch, cfg.segments, state, channels), F32),
     jax.ShapeDtypeStruct((batch, cfg.segments, channels), F32)),
    (s["seg_state"], s["seg_vec"]), grid, seg_len=seg_len,
  )  # fmt: skip
  decay = jnp.exp2(dt_sum[:, :, None, :] * a2)  # (B, S, N, D): P_s
  starts = [jnp.zeros_like(ends[:, 0])]
  for i in range(cfg.segments - 1):  # S - 1 elementwise steps: XLA fuses them
    starts.append(decay[:, i] * starts[-1] + ends[:, i])
  return jnp.stack(starts, axis=1), dt_sum


def _forward(cfg, u, delta, a2, B, C, D, bias, z, keep_states=True):
  """y and, with `keep_states`, the states the backward restarts from (else only each segment's
  end state: a forward with no backward writes no per-chunk states)."""
  batch, length, channels = u.shape
  seg_len, state = length // cfg.segments, a2.shape[0]
  grid = (batch, cfg.segments, channels // cfg.block_d)
  if cfg.segments > 1:
    h0, dt_sum = _segment_starts(cfg, u, delta, a2, B, bias)
  else:
    h0 = jnp.zeros((batch, 1, state, channels), F32)
    dt_sum = jnp.zeros((batch, 1, channels), F32)  # unused: no segments to combine
  s = _specs(seg_len, state, cfg)
  has_z = z is not None
  ins = (u, delta, *((z,) if has_z else ()), B, C, a2, D, bias, h0)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  in_specs += [s["state_rows"], s["state_rows"], s["param"], s["vec"], s["vec"], s["seg_state"]]
  saved = cfg.segments * _saved_states(seg_len, cfg) if keep_states else cfg.segments
  y, states = _call(
    cfg, kernels.forward_kernel, "selective_scan_lanes_fwd", ins, in_specs,
    (jax.ShapeDtypeStruct(u.shape, u.dtype),
     jax.ShapeDtypeStruct((batch, saved, state, channels), F32)),
    (s["rows"], s["chunk_states" if keep_states else "seg_state"]), grid,
    seg_len=seg_len, has_z=has_z, prefetch=cfg.prefetch, save_every=cfg.save_every,
    keep_states=keep_states,
  )  # fmt: skip
  return y, states, dt_sum


def _segment_end_adjoints(cfg, delta, a2, C, bias, z, g, dt_sum):
  """Adjoint entering each segment's end from the later segments, (B, S, N, D)."""
  batch, length, channels = delta.shape
  seg_len, state = length // cfg.segments, a2.shape[0]
  grid = (batch, cfg.segments, channels // cfg.block_d)
  s = _specs(seg_len, state, cfg)
  has_z = z is not None
  ins = (delta, g, *((z,) if has_z else ()), C, a2, bias)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  in_specs += [s["state_rows"], s["param"], s["vec"]]
  local = _call(
    cfg, kernels.segment_adjoint_kernel, "selective_scan_lanes_adjoints", ins, in_specs,
    jax.ShapeDtypeStruct((batch, cfg.segments, state, channels), F32), s["seg_state"], grid,
    seg_len=seg_len, has_z=has_z,
  )  # fmt: skip
  decay = jnp.exp2(dt_sum[:, :, None, :] * a2)  # (B, S, N, D)
  ends = [jnp.zeros_like(local[:, 0])]
  for i in reversed(range(1, cfg.segments)):  # dh_{i-1} = a_i + P_i dh_i
    ends.append(local[:, i] + decay[:, i] * ends[-1])
  return jnp.stack(ends[::-1], axis=1)


def _backward(cfg, res, g):
  u, delta, a2, B, C, D, bias, z, states, dt_sum = res
  batch, length, channels = u.shape
  seg_len, state = length // cfg.segments, a2.shape[0]
  num_blocks = channels // cfg.block_d
  grid = (batch, cfg.segments, num_blocks)
  if cfg.segments > 1:
    dh_end = _segment_end_adjoints(cfg, delta, a2, C, bias, z, g, dt_sum)
  else:
    dh_end = jnp.zeros((batch, 1, state, channels), F32)
  s = _specs(seg_len, state, cfg)
  has_z = z is not None
  ins = (u, delta, *((z,) if has_z else ()), g, B, C, a2, D, bias, states, dh_end)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ()), s["rows"]]
  in_specs += [s["state_rows"], s["state_rows"], s["param"], s["vec"], s["vec"]]
  in_specs += [s["chunk_states"], s["seg_state"]]
  seg_shape = (batch, cfg.segments, state, channels)
  lane_reduce = cfg.kernel_lane_reduce
  sums_shape = (batch, num_blocks, length) + (
    (_lane_groups(state), cfg.block_d) if lane_reduce else (2 * state,)
  )
  out_shape = [
    jax.ShapeDtypeStruct(u.shape, u.dtype),
    jax.ShapeDtypeStruct(delta.shape, delta.dtype),
    *((jax.ShapeDtypeStruct(z.shape, z.dtype),) if has_z else ()),
    jax.ShapeDtypeStruct(sums_shape, F32),  # [dB | dC] per channel block
    jax.ShapeDtypeStruct(seg_shape, F32),  # dAᵀ per (sample, segment)
    jax.ShapeDtypeStruct(seg_shape[:2] + (channels,), F32),  # dD per (sample, segment)
    jax.ShapeDtypeStruct(seg_shape[:2] + (channels,), F32),  # dbias per (sample, segment)
  ]
  out_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  out_specs += [s["lane_sums" if lane_reduce else "channel_sums"]]
  out_specs += [s["seg_state"], s["seg_vec"], s["seg_vec"]]
  if cfg.save_every > 1:  # scratch rows: the states entering the chunks of the current group
    out_shape.append(jax.ShapeDtypeStruct(seg_shape[:2] + (cfg.save_every,) + seg_shape[2:], F32))
    out_specs.append(s["group_starts"])
  outs = _call(
    cfg, kernels.backward_kernel, "selective_scan_lanes_bwd", ins, in_specs, tuple(out_shape),
    tuple(out_specs), grid, seg_len=seg_len, has_z=has_z, lane_reduce=lane_reduce,
    save_every=cfg.save_every,
  )  # fmt: skip
  outs = outs[: len(outs) - (cfg.save_every > 1)]
  d_b, d_c = (  # (B, blocks, L·N), as B and C enter the kernels
    x.reshape(batch, num_blocks, -1) for x in _split_channel_sums(outs[-4], state, lane_reduce)
  )
  outs = (*outs[:-4], d_b, d_c, *outs[-3:])
  return kernel_cotangents(outs, has_z, (0, 1), a2, B, C, D, bias)  # programs: (sample, segment)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scan(cfg, u, delta, a2, B, C, D, bias, z):
  return _forward(cfg.forward(), u, delta, a2, B, C, D, bias, z, keep_states=False)[0]


def _fused_scan_fwd(cfg, u, delta, a2, B, C, D, bias, z):
  y, states, dt_sum = _forward(cfg.forward(), u, delta, a2, B, C, D, bias, z)
  return y, (u, delta, a2, B, C, D, bias, z, states, dt_sum)


_fused_scan.defvjp(_fused_scan_fwd, _backward)


def selective_scan_pallas_lanes(
  u, delta, A, B, C, D, delta_bias, delta_softplus, z, chunk_size=None, *, block_d=None,
  fwd_block_d=None, fwd_chunk=None,
  num_warps=None, segments=None, save_every=None, prefetch=None, fast_exp=None, lane_reduce=None,
  fast_act=None, interpret=None,
):  # fmt: skip
  """Fused selective scan, lanes = channels; same arguments and result as `scan.selective_scan`.

  Launch parameters left None take `DEFAULTS` (segments: `default_segments`, fwd_block_d:
  `default_fwd_block_d`). Channels are padded with zeros to a multiple of both block sizes (A = 0,
  D = 0: the padded channels stay 0) and, with segments > 1 or chunks grouped (save_every > 1,
  fwd_chunk != chunk_size), the length to segments x (a multiple of save_every x chunk); both are
  sliced off.
  """
  batch, length, channels = u.shape
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  block_d = block_d or DEFAULTS["block_d"]
  warps = num_warps or DEFAULTS["num_warps"]
  segments = segments or default_segments(batch, length, channels, block_d)
  chunk = min(chunk_size or DEFAULTS["chunk"], -(-length // segments))
  save_every = save_every or DEFAULTS["save_every"]
  fwd_chunk = min(fwd_chunk or chunk, chunk * save_every)
  if chunk * save_every % fwd_chunk:
    raise ValueError(
      f"fwd_chunk={fwd_chunk} must divide chunk_size x save_every = {chunk * save_every}: both "
      "passes restart from the states saved that often."
    )
  cfg = KernelConfig(
    block_d=block_d,
    fwd_block_d=fwd_block_d or default_fwd_block_d(batch, channels, block_d, warps, segments),
    num_warps=warps,
    chunk=chunk,
    fwd_chunk=fwd_chunk,
    segments=segments,
    save_every=save_every,
    prefetch=DEFAULTS["prefetch"] if prefetch is None else prefetch,
    fast_exp=DEFAULTS["fast_exp"] if fast_exp is None else fast_exp,
    lane_reduce=DEFAULTS["lane_reduce"] if lane_reduce is None else lane_reduce,
    fast_act=DEFAULTS["fast_act"] if fast_act is None else fast_act,
    softplus=delta_softplus,
    interpret=interpret,
  )
  multiple = math.lcm(cfg.block_d, cfg.fwd_block_d)
  padded_d = -(-channels // multiple) * multiple
  seg_len = -(-length // segments)
  unit = cfg.save_every * chunk  # steps between saved states
  # The kernels handle a last partial chunk when no pass groups chunks.
  whole = segments == 1 and cfg.save_every == 1 and fwd_chunk == chunk
  padded_l = length if whole else segments * (-(-seg_len // unit) * unit)
  if delta_bias is None:
    delta_bias = jnp.zeros((channels,), F32)
  a2 = A.astype(F32).T * v1.LOG2_E  # (N, D); exp(ΔA) = exp2(Δ·A·log2 e)
  u, delta, z = (pad_axis(pad_axis(x, 2, padded_d), 1, padded_l) for x in (u, delta, z))
  # B, C in float32: (B, L, N) is small, and the kernels then convert nothing per (t, n).
  B, C = (pad_axis(x.astype(F32), 1, padded_l).reshape(batch, -1) for x in (B, C))  # (B, L·N)
  D, delta_bias = (pad_axis(x, 0, padded_d) for x in (D, delta_bias))
  a2 = pad_axis(a2, 1, padded_d)
  y = _fused_scan(cfg, u, delta, a2, B, C, D, delta_bias, z)  # (B, padded L, padded D)
  return y[:, :length, :channels]
