"""DiM's blocks, and the two layouts the backbone holds them in (`model.stack_blocks`).

With depth = 1 + 2E, block 0 is a stem, blocks 1..E form the encoder (each leaves a U-ViT long
skip) and blocks E+1..2E the decoder: decoder block i fuses the skip of encoder block 2E + 1 - i,
its mirror. Block i scans in direction `layout.scan_schedule(depth)[i]`; these cycle with period 4.

  unstacked  `blocks/<i>/...`, i = 0..depth-1, run one after the other: XLA traces and compiles
             every block's forward and backward apart (49 copies for DiM-H/2).
  stacked    every 4 consecutive encoder blocks have the same structure and directions, so their
             parameters are stacked along a leading "layers" axis and `nnx.scan` runs one compiled
             body over the G = E // 4 groups; likewise the 4 mirrors of each group in the decoder,
             scanned in reverse so that each decoder group takes its mirror group's skips as
             stacked scan inputs (the skips of a group are its scan outputs). The E mod 4 encoder
             blocks that fill no group, and their mirrors, run one by one (all of them when
             there would be fewer than MIN_GROUPS groups):

               blocks/stem/...              block 0
               blocks/encoder/<j>/...       (G, ...): [h] is encoder block 4h + 1 + j
               blocks/encoder_rest/<k>/...  encoder block 4G + 1 + k
               blocks/decoder_rest/<k>/...  the mirror of encoder_rest/<k>
               blocks/decoder/<j>/...       (G, ...): [h] is the mirror of encoder/<j>[h]

Both layouts hold the same parameters (a stacked model is initialised as the unstacked one, then
stacked) and compute the same function; `convert_layout` maps a checkpoint's names between them.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from dim_jax import parallel
from dim_jax.models import layout
from dim_jax.models.layers import RMSNorm, linear
from dim_jax.models.mamba import MambaMixer
from dim_jax.ops.scan import ScanConfig

NUM_PREFIX = 2 + layout.NUM_PAD  # [t_tok, y_tok, sep_1, sep_2, sep_3]: never permuted
GROUP = len(layout.PATTERNS)  # blocks per stacked group: the period of the scan directions
# Fewer groups are not stacked: a scan over a single group compiles slower than its blocks one by
# one (the scan's own machinery, with nothing to share).
MIN_GROUPS = 2
LAYERS = {nnx.PARTITION_NAME: "layers"}  # the stacked axis's logical name (see `mesh.rules`)


class SkipFusion(nnx.Module):
  """U-ViT long skip into a decoder block: Linear(h) + Linear(skip), or Linear(cat) for D <= 512."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.concat = dim <= 512
    if self.concat:
      self.proj = linear(2 * dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
    else:
      self.proj_h = linear(dim, dim, axes=("embed", None), dtype=dtype, rngs=rngs)
      self.proj_skip = linear(dim, dim, axes=("embed", None), dtype=dtype, rngs=rngs)

  def __call__(self, h: jax.Array, skip: jax.Array) -> jax.Array:
    if self.concat:
      out = self.proj(jnp.concatenate([h, skip], axis=-1))
    else:
      out = self.proj_h(h) + self.proj_skip(skip)
    return out.astype(jnp.float32)


class DiMBlock(nnx.Module):
  """Pre-norm Mamba layer with adaLN-single.

  stream + (1 + gate) * Mamba(RMSNorm(stream) * (1 + scale) + shift)
  """

  def __init__(
    self,
    dim: int,
    *,
    pattern: int,
    is_decoder: bool,
    num_layers: int,
    d_state: int,
    d_conv: int,
    expand: int,
    scan: ScanConfig,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.pattern = pattern  # the scan direction of this layer (layout.PATTERNS)
    self.skip_fusion = SkipFusion(dim, dtype=dtype, rngs=rngs) if is_decoder else None
    self.norm = RMSNorm(dim, rngs=rngs)
    self.mixer = MambaMixer(
      dim,
      num_layers=num_layers,
      d_state=d_state,
      d_conv=d_conv,
      expand=expand,
      scan=scan,
      dtype=dtype,
      rngs=rngs,
    )
    self.table = nnx.Param(
      jax.random.normal(rngs.params(), (3, dim), jnp.float32) / dim**0.5,
      out_sharding=(None, "embed"),
    )
    self.dtype = dtype

  def __call__(self, stream: jax.Array, modulation: jax.Array) -> jax.Array:
    """stream (B, L, D) float32 in this layer's scan order; modulation (B, 3, D) -> (B, L, D)."""
    shift, scale, gate = jnp.unstack(self.table[...][None] + modulation, axis=1)  # (B, D) each
    stream = parallel.shard_batch(stream)
    x = self.norm(stream) * (1 + scale[:, None]) + shift[:, None]
    out = self.mixer(x.astype(self.dtype))
    return parallel.shard_batch(stream + (1 + gate[:, None]) * out.astype(jnp.float32))


def run_block(block, stream, pattern, skip=None, *, modulation, grid, apply_block):
  """One block: fuse its long skip (decoder blocks), reorder the tokens from `pattern` into the
  block's scan direction, apply it (through `apply_block`, which rematerialises).

  stream (B, L, D) float32, its tokens in `pattern` order -> (stream, block.pattern)."""
  if skip is not None:
    stream = block.skip_fusion(stream, skip)  # the skip is already in this order
  prefix, tokens = stream[:, :NUM_PREFIX], stream[:, NUM_PREFIX:]
  tokens = layout.switch_pattern(tokens, pattern, block.pattern, grid)
  stream = jnp.concatenate([prefix, tokens], axis=1)
  return apply_block(block, stream, modulation), block.pattern


def run_unstacked(blocks: nnx.List, stream: jax.Array, run) -> jax.Array:
  """The unstacked layout, block by block; `run` is `run_block` with its keywords bound."""
  num_encoder = (len(blocks) - 1) // 2
  skips, pattern = [], layout.RASTER
  for i, block in enumerate(blocks):
    stream, pattern = run(block, stream, pattern, skips.pop() if i > num_encoder else None)
    if 1 <= i <= num_encoder:
      skips.append(stream)
  return stream


def num_groups(num_encoder: int) -> int:
  """Stacked groups of GROUP blocks on each side (0 below MIN_GROUPS)."""
  groups = num_encoder // GROUP
  return groups if groups >= MIN_GROUPS else 0


def stack_modules(modules: list[nnx.Module]) -> nnx.Module | None:
  """Modules of one structure -> one module holding their parameters stacked on a leading
  "layers" axis (the logical axis added to each parameter's sharding names); None for none."""
  if not modules:
    return None
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(m) for m in modules))
  return nnx.merge(nnx.graphdef(modules[0]), nnx.spmd.add_axis(state, 0, LAYERS))


class StackedBlocks(nnx.Module):
  """The stacked layout (module docstring): stem, scanned encoder groups, the rest one by one,
  then the scanned decoder groups."""

  def __init__(self, blocks: list[DiMBlock]):
    num_encoder = (len(blocks) - 1) // 2
    full = GROUP * num_groups(num_encoder)  # encoder blocks in stacked groups

    def mirror(e: int) -> DiMBlock:
      return blocks[2 * num_encoder + 1 - e]

    starts = range(1, full + 1, GROUP)
    self.stem = blocks[0]
    self.encoder = stack_modules([nnx.List(blocks[s : s + GROUP]) for s in starts])
    self.encoder_rest = nnx.List(blocks[full + 1 : num_encoder + 1])
    self.decoder_rest = nnx.List([mirror(e) for e in range(full + 1, num_encoder + 1)])
    self.decoder = stack_modules(
      [nnx.List([mirror(e) for e in range(s, s + GROUP)]) for s in starts]
    )

  def __call__(self, stream: jax.Array, run) -> jax.Array:
    """stream (B, L, D) in raster order -> the same after all blocks; `run` as in run_unstacked.
    Every group starts and ends in raster order (the directions' period), as the rest does."""
    stream, _ = run(self.stem, stream, layout.RASTER)
    skips = ()
    if self.encoder is not None:
      stream, skips = _encoder_groups(self.encoder, stream, run)
    rest_skips, pattern = [], layout.RASTER
    for block in self.encoder_rest:
      stream, pattern = run(block, stream, pattern)
      rest_skips.append(stream)
    for block in reversed(self.decoder_rest):  # mirrors, innermost first
      stream, pattern = run(block, stream, pattern, rest_skips.pop())
    if self.decoder is not None:
      stream = _decoder_groups(self.decoder, stream, skips, run)
    return stream


def _encoder_groups(groups: nnx.List, stream: jax.Array, run):
  """-> (stream, skips): 4 arrays (G, B, L, D), [h] the output of group h's block j."""

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0), transform_metadata=LAYERS)
  def group(blocks, stream):
    skips, pattern = [], layout.RASTER
    for block in blocks:
      stream, pattern = run(block, stream, pattern)
      skips.append(stream)
    return stream, tuple(skips)

  return group(groups, stream)


def _decoder_groups(groups: nnx.List, stream: jax.Array, skips: tuple, run) -> jax.Array:
  """Group h (the mirror of encoder group h) runs after group h + 1, its blocks in the reverse of
  their mirrors' order, each fusing its mirror's skip."""

  @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry, reverse=True, transform_metadata=LAYERS)
  def group(blocks, stream, skips):
    pattern = layout.RASTER
    for j in reversed(range(GROUP)):
      stream, pattern = run(blocks[j], stream, pattern, skips[j])
    return stream

  return group(groups, stream, skips)


@functools.cache
def block_places(depth: int) -> dict[int, tuple[str, int | None]]:
  """Unstacked block i -> (its path under blocks/ in the stacked layout, its index along the
  layers axis or None where it is not stacked)."""
  num_encoder = (depth - 1) // 2
  full = GROUP * num_groups(num_encoder)
  places = {0: ("stem", None)}
  for i in range(1, depth):
    side, e = ("encoder", i) if i <= num_encoder else ("decoder", 2 * num_encoder + 1 - i)
    if e <= full:
      places[i] = (f"{side}/{(e - 1) % GROUP}", (e - 1) // GROUP)
    else:
      places[i] = (f"{side}_rest/{e - full - 1}", None)
  return places


# A block parameter's name in either layout, after any prefix ("params/", "opt_state/0/mu/", ...).
_BLOCK_NAME = re.compile(
  r"(?P<head>(?:.*/)?blocks/)(?P<where>\d+|stem|(?:en|de)coder(?:_rest)?/\d+)/(?P<tail>.+)"
)


def convert_layout(flat: dict, depth: int, *, stack=jnp.stack, take=lambda x, h: x[h]) -> dict:
  """{name: leaf} with block parameters in one layout -> the same in the other; other names pass
  unchanged. `stack(list)` and `take(leaf, h)` build and split the layers axis (for arrays by
  default; the checkpoint code passes versions for shapes and shardings)."""
  places = block_places(depth)
  block_at = {place: i for i, place in places.items()}
  out, parts = {}, collections.defaultdict(dict)
  for name, leaf in flat.items():
    match = _BLOCK_NAME.fullmatch(name)
    if match is None:
      out[name] = leaf
      continue
    head, where, tail = match["head"], match["where"], match["tail"]
    if where.isdigit():  # unstacked -> stacked
      place, h = places[int(where)]
      if h is None:
        out[f"{head}{place}/{tail}"] = leaf
      else:
        parts[f"{head}{place}/{tail}"][h] = leaf
    elif where.startswith(("encoder/", "decoder/")):  # stacked -> unstacked
      for h in range(leaf.shape[0]):
        out[f"{head}{block_at[where, h]}/{tail}"] = take(leaf, h)
    else:
      out[f"{head}{block_at[where, None]}/{tail}"] = leaf
  for name, by_group in parts.items():
    out[name] = stack([by_group[h] for h in range(len(by_group))])
  return out
