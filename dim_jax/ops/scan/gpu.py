"""`impl="pallas_gpu"` of `selective_scan`: the lanes = channels kernels of `gpu_kernels.py` behind
a `jax.custom_vjp`, with the launch settings, the sequence split and the padding.

Lowered through Triton on the GPU; on the CPU the Pallas interpreter runs the same kernels (what the
tests check). One program is one warp: the backward's block of channels is 32, one per lane.

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

Kept for the backward: the inputs, one float32 (N, D) state per chunk x save_every steps and
sample, and ΣΔ per segment: O(B·L·D + B·(L/(chunk·save_every))·D·N).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dim_jax.ops.scan import gpu_kernels as kernels
from dim_jax.ops.scan.config import SCAN_STATES, ScanConfig
from dim_jax.ops.scan.xla import pad_to

F32 = jnp.float32
# The forward waits on its loads once per chunk, so longer chunks hide more latency, until the
# unrolled chunk no longer fits the registers (chunk 8 spills, and compiles for minutes).
DEFAULT_CHUNK = 4
# Below this many single-warp programs (4 per SM of an H200's 132), split the sequence: batch 1 at
# D = 3072 has only 96 programs.
MIN_PROGRAMS = 4 * 132
SPLIT_SEGMENTS = 32  # 8 and 16 segments were slower at L = 9216, batch 1; 64 no faster
MIN_SEGMENT_STEPS = 128  # shorter segments: the second pass of exps would not pay


@dataclasses.dataclass(frozen=True)
class Launch:
  """Static launch parameters of the backward kernels; `forward()` gives the forward's."""

  block_d: int  # channels per program (one warp): 32, one per lane, for the warp butterfly
  fwd_block_d: int  # the forward's: no channel sums there, so two channels per lane can pay
  chunk: int
  fwd_chunk: int  # a divisor of chunk x save_every
  segments: int
  save_every: int  # chunks per state kept for the backward (> 1: recomputed there, less memory)
  softplus: bool
  interpret: bool

  def forward(self):
    """The forward kernels save a state every chunk x save_every steps as well, in chunks of
    their own."""
    every = self.chunk * self.save_every // self.fwd_chunk
    return dataclasses.replace(
      self, block_d=self.fwd_block_d, chunk=self.fwd_chunk, save_every=every
    )  # fmt: skip


def default_fwd_block_d(batch: int, channels: int, segments: int) -> int:
  """Two channels per lane in the forward when that still gives MIN_PROGRAMS programs (at DiM-H's
  256² shape the forward is 10 % faster with them)."""
  wide = 2 * kernels.LANES
  if segments == 1 and batch * -(-channels // wide) >= MIN_PROGRAMS:
    return wide
  return kernels.LANES


def default_segments(batch: int, length: int, channels: int) -> int:
  """Sequence segments: 1 when batch x channel blocks fill the GPU, else 32 if each segment keeps
  at least MIN_SEGMENT_STEPS steps (the split costs a second pass of exps, worth it only for long
  sequences)."""
  programs = batch * -(-channels // kernels.LANES)
  if programs >= MIN_PROGRAMS or length < SPLIT_SEGMENTS * MIN_SEGMENT_STEPS:
    return 1
  return SPLIT_SEGMENTS


def _compiler_params(cfg):
  return None if cfg.interpret else pltriton.CompilerParams(num_warps=1, num_stages=1)


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
    # Per channel block: [dB | dC] sums in rows of 32, (B, blocks, L, G, 32).
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


def _call(cfg, kernel, name, ins, in_specs, out_shape, out_specs, grid, **static):
  return pl.pallas_call(
    functools.partial(
      kernel, chunk=cfg.chunk, softplus=cfg.softplus, native=not cfg.interpret, **static
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
    seg_len=seg_len, has_z=has_z, save_every=cfg.save_every, keep_states=keep_states,
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
  sums_shape = (batch, num_blocks, length, _lane_groups(state), kernels.LANES)
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
  out_specs += [s["lane_sums"]]
  out_specs += [s["seg_state"], s["seg_vec"], s["seg_vec"]]
  if cfg.save_every > 1:  # scratch rows: the states entering the chunks of the current group
    out_shape.append(jax.ShapeDtypeStruct(seg_shape[:2] + (cfg.save_every,) + seg_shape[2:], F32))
    out_specs.append(s["group_starts"])
  outs = _call(
    cfg, kernels.backward_kernel, "selective_scan_lanes_bwd", ins, in_specs, tuple(out_shape),
    tuple(out_specs), grid, seg_len=seg_len, has_z=has_z, save_every=cfg.save_every,
  )  # fmt: skip
  du, d_delta = outs[:2]
  dz = outs[2] if has_z else None
  sums, da, dd, dbias = outs[2 + has_z : 6 + has_z]
  sums = jnp.sum(sums, axis=1).reshape(batch, length, -1)  # over blocks; lane l of row g: 32·g + l
  d_b, d_c = (x.reshape(B.shape) for x in (sums[..., :state], sums[..., state : 2 * state]))
  per_program = (0, 1)  # dA, dD, dbias are partial sums per (sample, segment)
  return (
    du,
    d_delta,
    (jnp.sum(da, axis=per_program) * kernels.LN_2).astype(a2.dtype),  # of A·log2 e: dA·ln 2
    d_b.astype(B.dtype),
    d_c.astype(C.dtype),
    jnp.sum(dd, axis=per_program).astype(D.dtype),
    jnp.sum(dbias, axis=per_program).astype(bias.dtype),
    dz,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scan(cfg, u, delta, a2, B, C, D, bias, z):
  return _forward(cfg.forward(), u, delta, a2, B, C, D, bias, z, keep_states=False)[0]


def _fused_scan_fwd(cfg, u, delta, a2, B, C, D, bias, z):
  y, states, dt_sum = _forward(cfg.forward(), u, delta, a2, B, C, D, bias, z)
  # Named so that a remat policy can keep them (model.remat="save_scan"): a recomputation that
  # needs them reruns this whole kernel.
  states, dt_sum = checkpoint_name((states, dt_sum), SCAN_STATES)
  return y, (u, delta, a2, B, C, D, bias, z, states, dt_sum)


_fused_scan.defvjp(_fused_scan_fwd, _backward)


def launch(config: ScanConfig, shape, softplus, *, fwd_block_d=None, interpret=None) -> Launch:
  """The launch parameters for inputs of `shape` (batch, length, channels): the settings of
  `config`, its zeros replaced by the defaults. `fwd_block_d` overrides the forward's block."""
  batch, length, channels = shape
  segments = config.segments or default_segments(batch, length, channels)
  chunk = min(config.chunk or DEFAULT_CHUNK, -(-length // segments))
  fwd_chunk = min(config.fwd_chunk or chunk, chunk * config.save_every)
  if chunk * config.save_every % fwd_chunk:
    raise ValueError(
      f"model.scan.fwd_chunk={fwd_chunk} must divide chunk x save_every = "
      f"{chunk * config.save_every}: both passes restart from the states saved that often."
    )
  return Launch(
    block_d=kernels.LANES,
    fwd_block_d=fwd_block_d or default_fwd_block_d(batch, channels, segments),
    chunk=chunk,
    fwd_chunk=fwd_chunk,
    segments=segments,
    save_every=config.save_every,
    softplus=softplus,
    interpret=jax.default_backend() == "cpu" if interpret is None else interpret,
  )


def selective_scan(
  u, delta, A, B, C, D, delta_bias, delta_softplus, z, config: ScanConfig, **launch_overrides
):  # fmt: skip
  """Fused selective scan; same arguments and result as `dim_jax.ops.selective_scan`.

  Channels are padded with zeros to a multiple of both block sizes (A = 0, D = 0: the padded
  channels stay 0) and, with segments > 1 or chunks grouped (save_every > 1, fwd_chunk != chunk),
  the length to segments x (a multiple of save_every x chunk); both are sliced off.
  `launch_overrides`: `launch`'s keywords (the tests force the wide forward and the lowering).
  """
  batch, length, channels = u.shape
  cfg = launch(config, u.shape, delta_softplus, **launch_overrides)
  multiple = math.lcm(cfg.block_d, cfg.fwd_block_d)
  padded_d = -(-channels // multiple) * multiple
  seg_len = -(-length // cfg.segments)
  unit = cfg.save_every * cfg.chunk  # steps between saved states
  # The kernels handle a last partial chunk when no pass groups chunks.
  whole = cfg.segments == 1 and cfg.save_every == 1 and cfg.fwd_chunk == cfg.chunk
  padded_l = length if whole else cfg.segments * (-(-seg_len // unit) * unit)
  if delta_bias is None:
    delta_bias = jnp.zeros((channels,), F32)
  a2 = A.astype(F32).T * kernels.LOG2_E  # (N, D); exp(ΔA) = exp2(Δ·A·log2 e)
  u, delta, z = (pad_to(pad_to(x, 2, padded_d), 1, padded_l) for x in (u, delta, z))
  # B, C in float32: (B, L, N) is small, and the kernels then convert nothing per (t, n).
  B, C = (pad_to(x.astype(F32), 1, padded_l).reshape(batch, -1) for x in (B, C))  # (B, L·N)
  D, delta_bias = (pad_to(x, 0, padded_d) for x in (D, delta_bias))
  a2 = pad_to(a2, 1, padded_d)
  y = _fused_scan(cfg, u, delta, a2, B, C, D, delta_bias, z)  # (B, padded L, padded D)
  return y[:, :length, :channels]
