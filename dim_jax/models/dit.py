"""The DiT baseline (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2212.09748).

Forward pass, for x_t (B, H, W, C), t (B,), y (B,) -- the same interface as DiM:

  patch-p conv embed -> + fixed 2-D sin-cos position embedding of the grid (any grid, §3.1)
  -> N adaLN-Zero blocks conditioned on c = MLP(sin(t)) + Emb(y) (§3.2, Fig. 3)
  -> adaLN final layer -> linear -> unpatchify to an ε prediction (no learned Σ).

adaLN-Zero: every block regresses (shift, scale, gate) for its attention and its MLP from one
Linear(SiLU(c)) initialised to zero, so each block starts as the identity; the final modulation and
projection are zero too, so a freshly initialised DiT predicts exactly 0. Dense layers are
Xavier-uniform with zero bias, the timestep MLP and the label table N(0, 0.02), as in the official
code. The residual stream is float32; matmuls and attention run in `dtype`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dim_jax import parallel
from dim_jax.models.layers import (
  block_caller,
  compute_dtype,
  embedding_init,
  linear,
  patch_grid,
  timestep_embedding,
  unpatchify,
)

# Presets (DiT Table 1): width, depth, heads; "/2" is the patch size.
DIT_VARIANTS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
FREQ_DIM = 256  # sinusoid width fed to the timestep MLP
MLP_RATIO = 4
LN_EPS = 1e-6

xavier_init = nnx.initializers.xavier_uniform()
zeros_init = nnx.initializers.zeros_init()


def dit_preset(variant: str) -> dict:
  """'XL/2' -> dict(width=1152, depth=28, num_heads=16, patch_size=2)."""
  try:
    size, patch = variant.split("/")
    width, depth, num_heads = DIT_VARIANTS[size]
    return dict(width=width, depth=depth, num_heads=num_heads, patch_size=int(patch))
  except (ValueError, KeyError):
    raise ValueError(
      f"model.variant={variant!r}: use one of {[f'{k}/2' for k in DIT_VARIANTS]} or set it to "
      "'' and give model.width, model.depth and model.num_heads."
    ) from None


def sincos_position_embedding(h: int, w: int, dim: int) -> jax.Array:
  """Fixed 2-D sin-cos embedding of an h x w grid (MAE / DiT form) -> (h*w, dim) float32.

  The first dim/2 channels encode the column index, the last dim/2 the row index, each as
  [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1.
  """
  quarter = dim // 4
  omega = 1.0 / 10_000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)  # (dim/4,)

  def encode(pos):  # (h*w,) -> (h*w, dim/2)
    args = pos.astype(jnp.float32)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)

  rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  return jnp.concatenate([encode(cols.ravel()), encode(rows.ravel())], axis=-1)


def attention_implementation(choice: str, dtype) -> str:
  """'auto' -> cuDNN's fused attention on a GPU for 16-bit inputs (its only dtypes), else XLA."""
  if choice != "auto":
    return choice
  if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "xla"


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: x * (1 + scale) + shift, with (B, 1, D) shift and scale."""
  return x * (1 + scale) + shift


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without affine parameters (the modulation supplies them), eps 1e-6."""
  return nnx.LayerNorm(
    dim, epsilon=LN_EPS, use_bias=False, use_scale=False, use_fast_variance=False, rngs=rngs
  )


class SelfAttention(nnx.Module):
  """Multi-head softmax(Q Kᵀ / √d_head) V through `jax.nn.dot_product_attention`.

  The fused qkv projection's output is laid out head-major, (heads, [q, k, v], d_head), so that
  splitting its "heads" axis over devices keeps each head's q, k and v together.
  """

  def __init__(self, dim: int, num_heads: int, *, attention_impl: str, dtype, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.attention_impl = attention_impl
    self.dtype = dtype
    self.qkv = linear(
      dim, 3 * dim, axes=("embed", "heads"), kernel_init=xavier_init, dtype=dtype, rngs=rngs
    )
    self.proj = linear(
      dim, dim, axes=("heads", "embed"), kernel_init=xavier_init, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    qkv = self.qkv(x).reshape(batch, length, self.num_heads, 3, self.head_dim)
    q, k, v = jnp.unstack(qkv, axis=3)  # (B, L, heads, d_head) each
    out = jax.nn.dot_product_attention(
      q, k, v, implementation=attention_implementation(self.attention_impl, q.dtype)
    )
    return self.proj(out.reshape(batch, length, dim))  # (B, L, D)


class DiTBlock(nnx.Module):
  """adaLN-Zero block (DiT §3.2):

  x = x + gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)
  x = x + gate_m * MLP(LN(x) * (1 + scale_m) + shift_m),   MLP = Linear(GELU_tanh(Linear(.)))
  """

  def __init__(self, dim: int, num_heads: int, *, attention_impl: str, dtype, rngs: nnx.Rngs):
    hidden = MLP_RATIO * dim
    self.dtype = dtype
    self.norm_attn = _layer_norm(dim, rngs)
    self.attn = SelfAttention(dim, num_heads, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.norm_mlp = _layer_norm(dim, rngs)
    self.fc1 = linear(
      dim, hidden, axes=("embed", "mlp"), kernel_init=xavier_init, dtype=dtype, rngs=rngs
    )
    self.fc2 = linear(
      hidden, dim, axes=("mlp", "embed"), kernel_init=xavier_init, dtype=dtype, rngs=rngs
    )
    self.modulation = linear(
      dim, 6 * dim, axes=("embed", None), kernel_init=zeros_init, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x (B, L, D) float32 stream, c (B, D) conditioning -> (B, L, D) float32."""
    mods = self.modulation(nnx.silu(c).astype(self.dtype)).astype(jnp.float32)[:, None]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mods, 6, axis=-1)  # (B, 1, D)
    h = modulate(self.norm_attn(x), shift_a, scale_a).astype(self.dtype)
    x = x + gate_a * self.attn(h).astype(jnp.float32)
    h = modulate(self.norm_mlp(x), shift_m, scale_m).astype(self.dtype)
    h = self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))
    return x + gate_m * h.astype(jnp.float32)


class FinalLayer(nnx.Module):
  """LN(x) * (1 + scale) + shift -> Linear(D -> p*p*C); modulation and projection zero-init."""

  def __init__(self, dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm = _layer_norm(dim, rngs)
    self.modulation = linear(
      dim, 2 * dim, axes=("embed", None), kernel_init=zeros_init, dtype=dtype, rngs=rngs
    )
    self.proj = linear(
      dim, out_dim, axes=("embed", None), kernel_init=zeros_init, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mods = self.modulation(nnx.silu(c).astype(self.dtype)).astype(jnp.float32)[:, None]
    shift, scale = jnp.split(mods, 2, axis=-1)  # (B, 1, D) each
    h = modulate(self.norm(x), shift, scale).astype(self.dtype)
    return self.proj(h).astype(jnp.float32)  # (B, L, p*p*C)


class DiT(nnx.Module):
  """Diffusion Transformer: (x_t (B, H, W, C), t (B,), y (B,) int) -> ε prediction (B, H, W, C).

  The position embedding is a fixed function of the token grid, so one model runs at any input
  size whose sides are multiples of the patch size.
  """

  def __init__(
    self,
    *,
    in_channels: int,
    width: int,
    depth: int,
    num_heads: int,
    num_classes: int,
    patch_size: int = 2,
    attention_impl: str = "auto",
    remat: str = "none",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if width % num_heads:
      raise ValueError(f"model.width={width} is not divisible by model.num_heads={num_heads}.")
    if width % 4:
      raise ValueError(f"model.width={width}: the 2-D sin-cos embedding needs a multiple of 4.")
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl={attention_impl!r}: use one of {ATTENTION_IMPLS}.")
    self.in_channels, self.patch_size, self.width = in_channels, patch_size, width
    block_caller(remat)  # a bad name fails here, before any parameter is made
    self.remat = remat
    self.dtype = dtype

    # Xavier-uniform over the kernel seen as a (p*p*C, D) matrix, as DiT initialises its Conv.
    patch_init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    self.patch_embed = nnx.Conv(
      in_channels,
      width,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      kernel_init=nnx.with_partitioning(patch_init, (None, None, None, "embed")),
      bias_init=nnx.with_partitioning(zeros_init, ("embed",)),
      dtype=dtype,
      rngs=rngs,
    )
    self.time_in = linear(
      FREQ_DIM, width, axes=(None, "embed"), kernel_init=embedding_init, rngs=rngs
    )
    self.time_out = linear(
      width, width, axes=("embed", None), kernel_init=embedding_init, rngs=rngs
    )
    self.label_embed = nnx.Embed(
      num_classes + 1,  # the last row is the null class (classifier-free guidance)
      width,
      embedding_init=nnx.with_partitioning(embedding_init, ("vocab", "embed")),
      rngs=rngs,
    )
    self.blocks = nnx.List(
      [
        DiTBlock(width, num_heads, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        for _ in range(depth)
      ]
    )
    self.final = FinalLayer(width, patch_size**2 * in_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    p = self.patch_size
    h, w = patch_grid(x.shape, p, self.in_channels)
    tokens = self.patch_embed(x.astype(self.dtype)).reshape(batch, h * w, self.width)
    tokens = tokens.astype(jnp.float32) + sincos_position_embedding(h, w, self.width)  # (B, N, D)
    c = self.time_out(nnx.silu(self.time_in(timestep_embedding(t, FREQ_DIM))))
    c = c + self.label_embed(y)  # (B, D) float32

    apply_block = block_caller(self.remat)
    for block in self.blocks:  # rows kept split over the batch axes (parallel.shard_batch)
      tokens = parallel.shard_batch(apply_block(block, parallel.shard_batch(tokens), c))

    out = self.final(tokens, c)  # (B, N, p*p*C)
    return unpatchify(out.reshape(batch, h, w, -1), height, width, p)


def build_dit(cfg, rngs: nnx.Rngs) -> DiT:
  """DiT from the `model` config section: `variant` ("S/2" .. "XL/2") or width/depth/num_heads.

  Fields read: variant, width, depth, num_heads, patch_size, in_channels, num_classes,
  attention_impl, remat, dtype. input_size is not needed: the position embedding is computed for
  whatever grid the input has.
  """
  arch = dict(width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size)
  if cfg.get("variant"):
    arch = dit_preset(cfg.variant)
  return DiT(
    in_channels=cfg.in_channels,
    num_classes=cfg.num_classes,
    attention_impl=cfg.attention_impl,
    remat=cfg.remat,
    dtype=compute_dtype(cfg.dtype),
    rngs=rngs,
    **arch,
  )
