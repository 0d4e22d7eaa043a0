"""Analytic forward FLOPs per image for DiM and DiT, split by the kind of work.

Conventions: one multiply-add is 2 FLOPs; bias adds, norms, activations and the softmax are not
counted. Work is split so that each part can be set against its own bound:

  matmul     dense layers, incl. the patch embedding and the per-image conditioning MLPs
  attention  DiT's Q Kᵀ and A V (2 L² D multiply-adds per block)
  conv       depth-wise convolutions: DiM's two 3x3 smoothers and Mamba's causal conv1d
  scan       the selective scan's elementwise work, 6 FLOPs per (token, channel, state): Δ·A, the
             decay multiply, (Δu)·B, the state add and the C·h multiply-add
  exps       the scan's exp(Δ·A), one per (token, channel, state), counted apart (special-function
             units, not FMA units)

DiM's blocks run over the padded sequence (`layout.py`): 5 prefix tokens plus the
(h + 3) x (w + 3) grid, 366 / 1230 / 4494 / 9806 tokens at 256² / 512² / 1024² / 1536² latents.
"""

import dataclasses
import math

from dim_jax.models import layout
from dim_jax.models.dim import ADALN_FREQ_DIM, NUM_PREFIX
from dim_jax.models.dit import FREQ_DIM, MLP_RATIO


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs of one image, by kind (see the module docstring)."""

  matmul: float
  attention: float = 0.0
  conv: float = 0.0
  scan: float = 0.0
  exps: float = 0.0

  @property
  def dense(self) -> float:
    """The tensor-core part: matmuls and attention."""
    return self.matmul + self.attention

  @property
  def total(self) -> float:
    return self.matmul + self.attention + self.conv + self.scan


def dim_sequence_length(grid: tuple[int, int]) -> int:
  """Tokens a DiM block scans for an (h, w) patch grid: prefix + padded grid."""
  return NUM_PREFIX + math.prod(layout.padded_grid(*grid))


def dim_flops(
  *,
  width: int,
  depth: int,
  grid: tuple[int, int],
  patch_size: int,
  in_channels: int,
  d_state: int = 16,
  d_conv: int = 3,
  expand: int = 2,
) -> FlopCount:
  """DiM forward FLOPs per image for an (h, w) patch grid (the architecture of `dim.py`)."""
  d, n = width, d_state
  inner, dt_rank = expand * d, math.ceil(d / 16)
  tokens = math.prod(grid)  # image tokens
  length = dim_sequence_length(grid)  # what every block scans
  num_decoder = (depth - 1) // 2
  patch_dim = patch_size**2 * in_channels
  mixer = d * 2 * inner + inner * (dt_rank + 2 * n) + dt_rank * inner + inner * d  # per token
  macs = (
    tokens * patch_dim * d  # patch embedding
    + ADALN_FREQ_DIM * d
    + d * d
    + d * 3 * d  # adaLN-single MLP, once per image
    + depth * length * mixer  # in_proj, x_proj, dt_proj, out_proj
    + num_decoder * length * 2 * d * d  # long-skip fusion
    + d * 2 * d
    + tokens * d * patch_dim  # final modulation and projection
  )
  conv_macs = 2 * tokens * d * 9 + depth * length * inner * d_conv
  states = depth * length * inner * n
  return FlopCount(matmul=2 * macs, conv=2 * conv_macs, scan=6 * states, exps=states)


def dim_paper_gmacs(*, width: int, depth: int, grid: tuple[int, int], expand: int = 2) -> float:
  """DiM's published "GFLOPs" (210 for DiM-H at 256², 708 at 512²), which are GMACs of in_proj
  and the skip linears only: what fvcore counts when Mamba's fused kernel is opaque to it."""
  length = dim_sequence_length(grid)
  num_decoder = (depth - 1) // 2
  return (depth * length * width * 2 * expand * width + num_decoder * length * 2 * width**2) / 1e9


def dit_flops(
  *, width: int, depth: int, grid: tuple[int, int], patch_size: int, in_channels: int
) -> FlopCount:
  """DiT forward FLOPs per image for an (h, w) patch grid (architecture: `models/dit.py`)."""
  d = width
  tokens = math.prod(grid)
  patch_dim = patch_size**2 * in_channels
  block = (3 * d * d + d * d + 2 * MLP_RATIO * d * d) * tokens + 6 * d * d  # + adaLN-Zero
  macs = (
    tokens * patch_dim * d  # patch embedding
    + FREQ_DIM * d
    + d * d  # timestep MLP
    + depth * block
    + 2 * d * d
    + tokens * d * patch_dim  # final modulation and projection
  )
  attention_macs = depth * 2 * tokens * tokens * d  # Q Kᵀ and A V
  return FlopCount(matmul=2 * macs, attention=2 * attention_macs)
