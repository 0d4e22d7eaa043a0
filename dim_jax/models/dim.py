"""The DiM backbone (Teng et al., arXiv 2405.14224), exactly as the official code builds it.

Forward pass (official `mamba_2d.py`, `adapter_attn4mamba.py`) for x_t (B, H, W, C), t (B,), y (B,):

  patch-2 conv embed -> + position embedding (bilinearly resized to any grid) -> DW-conv 3x3
  -> pad each row / column end with 3 learnable tokens -> prepend [t_tok, y_tok, 3 separators]
  -> depth blocks, each scanning in its own direction (`layout.scan_schedule`), U-ViT long skips
     from encoder to decoder -> unpad -> DW-conv 3x3 -> modulated RMSNorm -> linear -> unpatchify.

The blocks (`dim_blocks.py`) are held one by one or, by default, stacked in groups of 4 that one
compiled `nnx.scan` body runs (`model.stack_blocks`); the function and the parameters are the same.

Conditioning enters twice: as the two prefix tokens and through adaLN-single (PixArt-α): one
(B, 3D) vector shared by all blocks, added to each block's own learned 3 x D table, in the
(1 + gate) form (no adaLN-Zero). The residual stream is kept in float32 (Mamba's residual_in_fp32).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dim_jax.models import layout
from dim_jax.models.dim_blocks import (
  NUM_PREFIX,
  DiMBlock,
  StackedBlocks,
  convert_layout,
  run_block,
  run_unstacked,
)
from dim_jax.models.layers import (
  RMSNorm,
  block_caller,
  embedding_init,
  linear,
  patch_grid,
  timestep_embedding,
  torch_default_bias_init,
  torch_default_init,
  unpatchify,
)
from dim_jax.ops.scan import ScanConfig, resolve_impl

ADALN_FREQ_DIM = 256  # sinusoid width fed to adaLN-single's timestep MLP (PixArt-α)


def resize_position_table(table: jax.Array, h: int, w: int) -> jax.Array:
  """(2 + g*g, D) table of a square g x g grid -> (2 + h*w, D); the 2 prefix rows are kept.

  Bilinear with half-pixel centres (torch's align_corners=False) and no anti-aliasing, as the
  official `pos_embed_inteplot` resizes for other resolutions.
  """
  g = round((table.shape[0] - 2) ** 0.5)
  if (h, w) == (g, g):
    return table
  dim = table.shape[-1]
  grid = jax.image.resize(table[2:].reshape(g, g, dim), (h, w, dim), "bilinear", antialias=False)
  return jnp.concatenate([table[:2], grid.reshape(h * w, dim).astype(table.dtype)], axis=0)


def depthwise_conv3x3(dim: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """The paper's "lightweight local feature enhancement": a depth-wise 3x3 conv with bias.

  Its 10 D parameters stay whole on every device: split over "fsdp" by channel, they made the
  partitioner split the conv by channel too, moving the (B, H, W, D) activations there and back
  (all-to-all, or on a data x fsdp mesh an all-gather of the whole batch)."""
  return nnx.Conv(
    dim,
    dim,
    kernel_size=(3, 3),
    padding="SAME",
    feature_group_count=dim,
    kernel_init=nnx.with_partitioning(torch_default_init, (None, None, None, None)),
    bias_init=nnx.with_partitioning(torch_default_bias_init(9), (None,)),
    dtype=dtype,
    rngs=rngs,
  )


class AdaLNSingle(nnx.Module):
  """(t, y) -> the (B, 3D) modulation shared by every block: Linear(SiLU(MLP(sin(t)) + Emb(y)))."""

  def __init__(self, dim: int, num_classes: int, *, dtype, rngs: nnx.Rngs):
    normal = embedding_init
    self.time_in = linear(ADALN_FREQ_DIM, dim, axes=(None, "embed"), kernel_init=normal, rngs=rngs)
    self.time_out = linear(dim, dim, axes=("embed", None), kernel_init=normal, rngs=rngs)
    self.label = nnx.Embed(
      num_classes + 1,
      dim,
      embedding_init=nnx.with_partitioning(normal, ("vocab", "embed")),
      rngs=rngs,
    )
    self.proj = linear(dim, 3 * dim, axes=("embed", None), dtype=dtype, rngs=rngs)

  def __call__(self, t: jax.Array, y: jax.Array) -> jax.Array:
    emb = self.time_out(nnx.silu(self.time_in(timestep_embedding(t, ADALN_FREQ_DIM))))
    emb = emb + self.label(y)  # (B, D)
    return self.proj(nnx.silu(emb)).astype(jnp.float32)  # (B, 3D)


class DiM(nnx.Module):
  """Diffusion Mamba: (x_t (B, H, W, C), t (B,), y (B,) int) -> ε prediction (B, H, W, C)."""

  def __init__(
    self,
    *,
    in_channels: int,
    input_size: int,
    width: int,
    depth: int,
    num_classes: int,
    patch_size: int = 2,
    d_state: int = 16,
    d_conv: int = 3,
    expand: int = 2,
    pad_layout: str = "lateral",
    scan_directions: int = 4,
    scan: ScanConfig = ScanConfig(),
    remat: str = "none",
    stack_blocks: bool = True,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if input_size % patch_size:
      raise ValueError(
        f"model.input_size={input_size} is not divisible by model.patch_size={patch_size}."
      )
    if d_conv != layout.NUM_PAD:
      raise ValueError(f"model.d_conv={d_conv}: DiM's 3 padding tokens assume d_conv = 3.")
    layout.scan_schedule(depth, scan_directions)  # validates depth and directions early
    if pad_layout not in layout.PAD_LAYOUTS:
      raise ValueError(f"model.pad_layout={pad_layout!r}: use one of {layout.PAD_LAYOUTS}.")
    self.in_channels, self.patch_size, self.width = in_channels, patch_size, width
    self.num_classes = num_classes
    self.pad_layout = pad_layout
    block_caller(remat)  # bad names fail here, before any parameter is made
    resolve_impl(scan.impl)
    self.remat = remat
    self.dtype = dtype
    self.grid_size = input_size // patch_size  # the grid the position table is stored at

    self.patch_embed = nnx.Conv(
      in_channels,
      width,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      kernel_init=nnx.with_partitioning(torch_default_init, (None, None, None, "embed")),
      bias_init=nnx.with_partitioning(
        torch_default_bias_init(in_channels * patch_size**2), ("embed",)
      ),
      dtype=dtype,
      rngs=rngs,
    )
    # (2 + N, D): entries for [t_tok, y_tok] then the patch grid in raster order; zero-init.
    self.pos_embed = nnx.Param(
      jnp.zeros((2 + self.grid_size**2, width), jnp.float32), out_sharding=(None, "embed")
    )
    self.label_embed = nnx.Embed(
      num_classes + 1,
      width,
      embedding_init=nnx.with_partitioning(embedding_init, ("vocab", "embed")),
      rngs=rngs,
    )
    self.adaln = AdaLNSingle(width, num_classes, dtype=dtype, rngs=rngs)
    self.first_smoother = depthwise_conv3x3(width, dtype, rngs)
    self.pad_tokens = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (layout.NUM_PAD, width)), out_sharding=(None, "embed")
    )
    self.separators = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (layout.NUM_PAD, width)), out_sharding=(None, "embed")
    )
    schedule = layout.scan_schedule(depth, scan_directions)
    blocks = [
      DiMBlock(
        width,
        pattern=schedule[i],
        is_decoder=i > (depth - 1) // 2,
        num_layers=depth,
        d_state=d_state,
        d_conv=d_conv,
        expand=expand,
        scan=scan,
        dtype=dtype,
        rngs=rngs,
      )
      for i in range(depth)
    ]
    # Initialised block by block in both layouts, so a seed gives the same weights in either.
    self.blocks = StackedBlocks(blocks) if stack_blocks else nnx.List(blocks)
    self.depth = depth
    self.last_smoother = depthwise_conv3x3(width, dtype, rngs)
    self.final_norm = RMSNorm(width, rngs=rngs)
    self.final_modulation = linear(width, 2 * width, axes=("embed", None), dtype=dtype, rngs=rngs)
    self.final_proj = linear(
      width, patch_size**2 * in_channels, axes=("embed", None), dtype=dtype, rngs=rngs
    )

  def resize_stored(self, name: str, value: jax.Array) -> jax.Array:
    """A parameter saved by a DiM of another input size, fitted to this one for a stage transition
    (`checkpoint.transfer_params`): only the position table differs, and its grid is resized."""
    if name != "pos_embed":
      return value
    return resize_position_table(value, self.grid_size, self.grid_size)

  def convert_layout(self, flat: dict, **ops) -> dict:
    """A flat {name: parameter} of the other block layout -> this one's (`dim_blocks`), for
    checkpoints written with the other `model.stack_blocks`; `ops` as in convert_layout."""
    return convert_layout(flat, self.depth, **ops)

  def position_embedding(self, h: int, w: int) -> jax.Array:
    """(2 + h*w, D): the stored table, its grid part bilinearly resized when (h, w) differs."""
    return resize_position_table(self.pos_embed[...], h, w)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    p = self.patch_size
    h, w = patch_grid(x.shape, p, self.in_channels)
    grid = layout.padded_grid(h, w)

    # Tokens: [t_tok, y_tok] prefix and the patch grid, both with position embedding.
    t_tok = timestep_embedding(t, self.width)  # (B, D)
    y_tok = self.label_embed(y).astype(jnp.float32)  # (B, D)
    pos = self.position_embedding(h, w)  # (2 + h*w, D)
    cond = jnp.stack([t_tok, y_tok], axis=1) + pos[:2]  # (B, 2, D)
    img = self.patch_embed(x.astype(self.dtype)).reshape(batch, h * w, self.width)
    img = img.astype(jnp.float32) + pos[2:]
    img = self.first_smoother(img.reshape(batch, h, w, self.width).astype(self.dtype))
    img = layout.pad_tokens(
      img.reshape(batch, h * w, self.width), self.pad_tokens[...], h, w, self.pad_layout
    )
    seps = jnp.broadcast_to(self.separators[...], (batch, layout.NUM_PAD, self.width))
    stream = jnp.concatenate([cond, seps, img.astype(jnp.float32)], axis=1)  # (B, 5 + Hp*Wp, D)

    modulation = self.adaln(t, y).reshape(batch, 3, self.width)
    run = functools.partial(
      run_block, modulation=modulation, grid=grid, apply_block=block_caller(self.remat)
    )
    if isinstance(self.blocks, StackedBlocks):
      stream = self.blocks(stream, run)
    else:
      stream = run_unstacked(self.blocks, stream, run)

    # Back in raster order (the schedule ends with pattern 0): drop prefix and pads.
    img = layout.unpad_tokens(stream[:, NUM_PREFIX:], h, w).reshape(batch, h, w, self.width)
    img = self.last_smoother(img.astype(self.dtype)).astype(jnp.float32)
    shift, scale = jnp.split(
      self.final_modulation(nnx.silu(t_tok + y_tok)).astype(jnp.float32), 2, -1
    )
    img = self.final_norm(img) * (1 + scale[:, None, None]) + shift[:, None, None]
    out = self.final_proj(img.astype(self.dtype)).astype(jnp.float32)  # (B, h, w, p*p*C)
    return unpatchify(out, height, width, p)
