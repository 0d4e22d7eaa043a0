"""`impl="pallas"` of `selective_scan`: the fused kernels of `scan_pallas_kernels.py` behind a
`jax.custom_vjp`, with the padding and the per-platform lowering choice.

Lowering: on GPU the Triton lowering (chosen in jax 0.11 by passing Triton `CompilerParams`), on
TPU Mosaic, on the CPU the Pallas interpreter (what the tests run). Kept for the backward pass:
the inputs and one float32 (D, N) state per chunk and sample, O(B·L·D + B·(L/chunk)·D·N).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dim_jax.ops import scan_pallas_kernels as kernels

DEFAULT_CHUNK = 8  # time steps unrolled per loop iteration (and between saved states)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters: channels and warps per program (GPU) of the forward and the
  backward kernel, steps per chunk."""

  block_d: int
  num_warps: int
  bwd_block_d: int
  bwd_num_warps: int
  prefetch: bool  # forward loads chunk c + 1 while computing chunk c
  bwd_prefetch: bool
  chunk: int
  softplus: bool
  interpret: bool


def default_block_d(batch: int, channels: int) -> int:
  """Channels per program. 4 on an H200 (measured, `.notes/scan.md`): the (N, 4) state tile is
  2 values per lane, needs no shared-memory layout change per step (larger blocks do) and gives
  768 single-warp programs at batch 1."""
  del batch, channels
  return 4


def _compiler_params(cfg: KernelConfig, num_warps: int):
  if cfg.interpret:
    return None
  if jax.default_backend() == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # only importable usefully on TPU hosts

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
  from jax.experimental.pallas import triton as pltriton

  return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _specs(length, state, bd, cfg):
  num_chunks = -(-length // cfg.chunk)
  return dict(
    rows=pl.BlockSpec((None, length, bd), lambda b, j: (b, 0, j)),  # u, δ, z, y, g: (B, L, D)
    state_rows=pl.BlockSpec((None, length, state), lambda b, j: (b, 0, 0)),  # B, C: (B, L, N)
    param=pl.BlockSpec((state, bd), lambda b, j: (0, j)),  # Aᵀ: (N, D)
    vec=pl.BlockSpec((bd,), lambda b, j: (j,)),  # D, bias: (D,)
    states=pl.BlockSpec((None, num_chunks, state, bd), lambda b, j: (b, 0, 0, j)),
    block_partial=pl.BlockSpec((None, None, length, state), lambda b, j: (b, j, 0, 0)),
    per_sample_param=pl.BlockSpec((None, state, bd), lambda b, j: (b, 0, j)),
    per_sample_vec=pl.BlockSpec((None, bd), lambda b, j: (b, j)),
  )


def _forward(cfg, u, delta, a2, B, C, D, bias, z):
  batch, length, channels = u.shape
  state = a2.shape[0]
  s = _specs(length, state, cfg.block_d, cfg)
  has_z = z is not None
  ins = (u, delta, *((z,) if has_z else ()), B, C, a2, D, bias)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  in_specs += [s["state_rows"], s["state_rows"], s["param"], s["vec"], s["vec"]]
  num_chunks = -(-length // cfg.chunk)
  kernel = functools.partial(
    kernels.forward_kernel,
    length=length,
    chunk=cfg.chunk,
    softplus=cfg.softplus,
    has_z=has_z,
    prefetch=cfg.prefetch,
  )
  return pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct(u.shape, u.dtype),
      jax.ShapeDtypeStruct((batch, num_chunks, state, channels), jnp.float32),
    ),
    grid=(batch, channels // cfg.block_d),
    in_specs=in_specs,
    out_specs=(s["rows"], s["states"]),
    compiler_params=_compiler_params(cfg, cfg.num_warps),
    interpret=cfg.interpret,
    name="selective_scan_fwd",
  )(*ins)


def _backward(cfg, res, g):
  u, delta, a2, B, C, D, bias, z, states = res
  batch, length, channels = u.shape
  state = a2.shape[0]
  num_blocks = channels // cfg.bwd_block_d
  s = _specs(length, state, cfg.bwd_block_d, cfg)
  has_z = z is not None
  ins = (u, delta, *((z,) if has_z else ()), B, C, g, a2, D, bias, states)
  in_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  in_specs += [s["state_rows"], s["state_rows"], s["rows"], s["param"], s["vec"], s["vec"]]
  in_specs += [s["states"]]
  f32 = jnp.float32
  out_shape = [
    jax.ShapeDtypeStruct(u.shape, u.dtype),
    jax.ShapeDtypeStruct(delta.shape, delta.dtype),
    *((jax.ShapeDtypeStruct(z.shape, z.dtype),) if has_z else ()),
    jax.ShapeDtypeStruct((batch, num_blocks, length, state), f32),  # dB per channel block
    jax.ShapeDtypeStruct((batch, num_blocks, length, state), f32),  # dC per channel block
    jax.ShapeDtypeStruct((batch, state, channels), f32),  # dAᵀ per sample
    jax.ShapeDtypeStruct((batch, channels), f32),  # dD per sample
    jax.ShapeDtypeStruct((batch, channels), f32),  # dbias per sample
  ]
  out_specs = [s["rows"], s["rows"], *((s["rows"],) if has_z else ())]
  out_specs += [s["block_partial"], s["block_partial"], s["per_sample_param"]]
  out_specs += [s["per_sample_vec"], s["per_sample_vec"]]
  kernel = functools.partial(
    kernels.backward_kernel,
    length=length,
    chunk=cfg.chunk,
    softplus=cfg.softplus,
    has_z=has_z,
    prefetch=cfg.bwd_prefetch,
  )
  outs = pl.pallas_call(
    kernel,
    out_shape=tuple(out_shape),
    grid=(batch, num_blocks),
    in_specs=in_specs,
    out_specs=tuple(out_specs),
    compiler_params=_compiler_params(cfg, cfg.bwd_num_warps),
    interpret=cfg.interpret,
    name="selective_scan_bwd",
  )(*ins)
  return kernel_cotangents(outs, has_z, 0, a2, B, C, D, bias)


def kernel_cotangents(outs, has_z, program_axes, a2, B, C, D, bias):
  """A backward kernel's outputs (du, dδ, [dz], dB, dC, dA, dD, dbias partials) -> the cotangents
  of (u, δ, A·log2 e, B, C, D, bias, z): dB, dC summed over channel blocks (axis 1), dA, dD, dbias
  over the per-program axes `program_axes` (sample, and segment for the lanes kernel)."""
  du, d_delta = outs[:2]
  dz = outs[2] if has_z else None
  db, dc, da, dd, dbias = outs[-5:]
  return (
    du,
    d_delta,
    (jnp.sum(da, axis=program_axes) * kernels.LN_2).astype(a2.dtype),  # dA·ln 2: of A·log2 e
    jnp.sum(db, axis=1).astype(B.dtype),
    jnp.sum(dc, axis=1).astype(C.dtype),
    jnp.sum(dd, axis=program_axes).astype(D.dtype),
    jnp.sum(dbias, axis=program_axes).astype(bias.dtype),
    dz,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scan(cfg, u, delta, a2, B, C, D, bias, z):
  return _forward(cfg, u, delta, a2, B, C, D, bias, z)[0]


def _fused_scan_fwd(cfg, u, delta, a2, B, C, D, bias, z):
  y, states = _forward(cfg, u, delta, a2, B, C, D, bias, z)
  return y, (u, delta, a2, B, C, D, bias, z, states)


_fused_scan.defvjp(_fused_scan_fwd, _backward)


def pad_axis(x, axis, size):
  """x zero-padded at the end of `axis` to `size` (None stays None)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def selective_scan_pallas(
  u, delta, A, B, C, D, delta_bias, delta_softplus, z, chunk_size=None, *, block_d=None,
  num_warps=1, bwd_block_d=None, bwd_num_warps=1, prefetch=True, bwd_prefetch=False,
  interpret=None,
):  # fmt: skip
  """Fused selective scan; same arguments and result as `scan.selective_scan`.

  Channels are padded to a multiple of the block sizes and states to a power of two with zeros
  (A = 0, B = C = 0: the padded states stay 0 and contribute nothing), then sliced off.
  """
  batch, length, channels = u.shape
  state = A.shape[1]
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  block_d = block_d or default_block_d(batch, channels)
  cfg = KernelConfig(
    block_d=block_d,
    num_warps=num_warps,
    bwd_block_d=bwd_block_d or block_d,
    bwd_num_warps=bwd_num_warps,
    prefetch=prefetch,
    bwd_prefetch=bwd_prefetch,
    chunk=min(chunk_size or DEFAULT_CHUNK, length),
    softplus=delta_softplus,
    interpret=interpret,
  )
  block_lcm = math.lcm(cfg.block_d, cfg.bwd_block_d)
  padded_d = -(-channels // block_lcm) * block_lcm
  padded_n = 1 << (state - 1).bit_length()  # Triton tiles are powers of two
  if delta_bias is None:
    delta_bias = jnp.zeros((channels,), jnp.float32)
  a2 = A.astype(jnp.float32).T * kernels.LOG2_E  # (N, D); exp(ΔA) = exp2(Δ·A·log2 e)
  u, delta, z = (pad_axis(x, 2, padded_d) for x in (u, delta, z))
  D, delta_bias = (pad_axis(x, 0, padded_d) for x in (D, delta_bias))
  a2 = pad_axis(pad_axis(a2, 1, padded_d), 0, padded_n)
  B, C = (pad_axis(x, 2, padded_n) for x in (B, C))
  y = _fused_scan(cfg, u, delta, a2, B, C, D, delta_bias, z)  # (B, L, padded D)
  return y[..., :channels]
