"""DiM's token layout: the padded token grid, the four scan directions and their per-layer schedule.

DiM (arXiv 2405.14224; official `adapter_attn4mamba.py`) scans a 2-D token grid with a 1-D Mamba.
Each layer scans in one of four directions, cycled across depth; a direction is only a reordering of
the tokens, so the scan itself is always a forward 1-D scan:

  pattern  0: row-major raster, top-left -> bottom-right
  pattern -2: the exact reverse of 0
  pattern  1: column-major, top-left going down each column
  pattern -1: the exact reverse of 1

The grid of h x w patch tokens is padded with 3 learnable tokens at the end of every row and 3 rows
at the bottom, so that it becomes (h + 3) x (w + 3): three pads fully cut the kernel-3 causal conv
window between consecutive rows (or columns, in column scans). Two fills of the pad positions exist:
'lateral' (pad column k and pad row k hold token k) and 'rho_pad' (the 3 tokens cycled over the pad
positions in raster order; works for any grid and is used at 512² and beyond).

All index maps here are static NumPy arrays computed from the grid size, so a model runs at any
grid without touching its parameters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

NUM_PAD = 3  # pads per row / column end; equals the Mamba conv kernel size (d_conv = 3).
RASTER, REVERSE_RASTER, COLUMN, REVERSE_COLUMN = 0, -2, 1, -1
PATTERNS = (RASTER, REVERSE_RASTER, COLUMN, REVERSE_COLUMN)
PAD_LAYOUTS = ("lateral", "rho_pad")


def scan_schedule(num_layers: int, num_directions: int = 4) -> list[int]:
  """The scan pattern of every layer, as the official code builds it.

  Layer 0 is a raster stem. Encoder layers 1..E cycle through [0, -2, 1, -1] (truncated to
  `num_directions` entries) starting at -2; decoder layer E+1+k mirrors encoder layer E-1-k, so each
  decoder layer receives its long skip in the order it scans and the last layer is back in raster
  order. For 49 layers: [0] + [-2, 1, -1, 0] * 6 + [-1, 1, -2, 0] * 6.

  Args:
    num_layers: depth; 1 + 2E with E encoder layers.
    num_directions: 4 (all), 2 (raster and its reverse) or 1 (raster only, the ablation).
  """
  if num_layers < 1 or num_layers % 2 != 1:
    raise ValueError(f"model.depth={num_layers}: DiM needs an odd depth (1 stem + 2E layers).")
  if num_directions not in (1, 2, 4):
    raise ValueError(f"model.scan_directions={num_directions}: use 1, 2 or 4.")
  cycle = PATTERNS[:num_directions]
  num_encoder = (num_layers - 1) // 2
  encoder = [cycle[e % len(cycle)] for e in range(1, num_encoder + 1)]
  stem_and_encoder = [RASTER, *encoder]
  decoder = [stem_and_encoder[num_encoder - 1 - k] for k in range(num_encoder)]
  return stem_and_encoder + decoder  # the last layer mirrors the stem: back in raster order


def padded_grid(h: int, w: int) -> tuple[int, int]:
  """(rows, cols) of the padded token grid for an h x w patch grid."""
  return h + NUM_PAD, w + NUM_PAD


@functools.cache
def _pad_fill_index(h: int, w: int, layout: str) -> np.ndarray:
  """For each position of the padded grid in raster order, the token it holds.

  Values < h*w index the image tokens (raster order); h*w + k means pad token k.
  """
  if layout not in PAD_LAYOUTS:
    raise ValueError(f"model.pad_layout={layout!r}: use one of {PAD_LAYOUTS}.")
  hp, wp = padded_grid(h, w)
  rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
  is_image = (rows < h) & (cols < w)
  index = np.where(is_image, rows * w + cols, -1)
  if layout == "lateral":
    # Pad column k holds token k in every image row; pad row k holds it across, corners included.
    pad_id = np.where(rows >= h, rows - h, cols - w)
  else:
    # rho_pad: tokens 0, 1, 2, 0, ... over the pad positions in raster order.
    pad_id = (np.cumsum(~is_image.ravel()) - 1).reshape(hp, wp) % NUM_PAD
  index = np.where(is_image, index, h * w + pad_id)
  return index.ravel().astype(np.int32)


@functools.cache
def _image_positions(h: int, w: int) -> np.ndarray:
  """Raster positions in the padded grid that hold image tokens, in image raster order."""
  _, wp = padded_grid(h, w)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return (rows * wp + cols).ravel().astype(np.int32)


def pad_tokens(tokens: jax.Array, pads: jax.Array, h: int, w: int, layout: str) -> jax.Array:
  """Inserts the learnable pads: (B, h*w, D) image tokens + (3, D) pads -> (B, (h+3)(w+3), D)."""
  batch = tokens.shape[0]
  pads = jnp.broadcast_to(pads.astype(tokens.dtype), (batch, *pads.shape))
  table = jnp.concatenate([tokens, pads], axis=1)  # (B, h*w + 3, D)
  return jnp.take(table, _pad_fill_index(h, w, layout), axis=1)


def unpad_tokens(x: jax.Array, h: int, w: int) -> jax.Array:
  """Drops the pads: (B, (h+3)(w+3), D) in raster order -> (B, h*w, D)."""
  return jnp.take(x, _image_positions(h, w), axis=1)


def raster_to_pattern(x: jax.Array, pattern: int, grid: tuple[int, int]) -> jax.Array:
  """Reorders (B, Hp*Wp, D) tokens from raster order into `pattern` order."""
  if pattern in (COLUMN, REVERSE_COLUMN):
    x = rearrange(x, "b (h w) d -> b (w h) d", h=grid[0])
  if pattern in (REVERSE_RASTER, REVERSE_COLUMN):
    x = jnp.flip(x, axis=1)
  return x


def pattern_to_raster(x: jax.Array, pattern: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `raster_to_pattern`."""
  if pattern in (REVERSE_RASTER, REVERSE_COLUMN):
    x = jnp.flip(x, axis=1)
  if pattern in (COLUMN, REVERSE_COLUMN):
    x = rearrange(x, "b (w h) d -> b (h w) d", h=grid[0])
  return x


def switch_pattern(x: jax.Array, src: int, dst: int, grid: tuple[int, int]) -> jax.Array:
  """Reorders tokens from the `src` scan order to the `dst` one (identity when equal)."""
  if src == dst:
    return x
  return raster_to_pattern(pattern_to_raster(x, src, grid), dst, grid)
