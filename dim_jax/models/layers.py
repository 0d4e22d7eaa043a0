"""Small building blocks shared by the backbones: initialisers, embeddings, sharded layers.

Initialisers follow what the official PyTorch code ends up with after its init passes
(`init_weights.py`, `utils.py:get_nnet`): PyTorch's default kaiming-uniform(a=√5) for Linear and
Conv weights, i.e. U(±1/√fan_in); zero Linear biases; N(0, 0.02) embedding tables.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dim_jax.ops.scan.config import SCAN_OUTPUT, SCAN_STATES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """model.dtype -> the JAX dtype of activations and matmuls (parameters stay float32)."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: use one of {list(DTYPES)}.")
  return DTYPES[name]


# jax.ad_checkpoint names of the Mamba mixer's input projection (B, L, 2E) and output (B, L, D).
IN_PROJ_OUTPUT, MIXER_OUTPUT = "in_proj_output", "mixer_output"

# model.remat: what a block keeps for the backward pass.
REMAT_POLICIES = {
  "none": None,  # every activation (fastest, most memory)
  "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input: recompute all
  # matmul outputs; the elementwise work, convolutions and the scan are recomputed
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # what costs most to recompute per byte kept: the mixer's in_proj and out_proj outputs (5/6 of
  # its matmul FLOPs), the scan's output and the fused scan's chunk states (else the backward
  # reruns the scan's forward kernel to get them back); the norm, the conv and the small x_proj
  # and dt_proj are recomputed
  "save_scan": jax.checkpoint_policies.save_only_these_names(
    IN_PROJ_OUTPUT, SCAN_OUTPUT, SCAN_STATES, MIXER_OUTPUT
  ),
}


def block_caller(remat: str):
  """(block, stream, cond) -> block(stream, cond), rematerialised per `REMAT_POLICIES[remat]`."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r}: use one of {sorted(REMAT_POLICIES)}.")

  def call(block, stream, cond):
    return block(stream, cond)

  return call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat])


def patch_grid(shape: tuple, patch: int, in_channels: int) -> tuple[int, int]:
  """(B, H, W, C) input shape -> the (h, w) patch grid, or one clear error."""
  _, height, width, channels = shape
  if height % patch or width % patch or channels != in_channels:
    raise ValueError(
      f"input of shape {tuple(shape)}: height and width must be divisible by "
      f"model.patch_size={patch} and channels must equal model.in_channels={in_channels}."
    )
  return height // patch, width // patch


def unpatchify(tokens: jax.Array, height: int, width: int, patch: int) -> jax.Array:
  """(B, h, w, p*p*C) per-patch outputs -> (B, h*p, w*p, C) image."""
  batch, h, w, _ = tokens.shape
  channels = tokens.shape[-1] // patch**2
  out = tokens.reshape(batch, h, w, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(batch, height, width, channels)


# U(±1/√fan_in): PyTorch's default Linear / Conv weight init (kaiming_uniform with a = √5).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
embedding_init = nnx.initializers.normal(stddev=0.02)


def uniform_init(bound: float):
  """U(-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_default_bias_init(fan_in: int):
  """PyTorch's default Conv bias init, U(±1/√fan_in)."""
  return uniform_init(1.0 / math.sqrt(fan_in))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin] of (B,) times -> (B, dim) float32 (U-ViT / DDPM form)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def linear(
  din: int,
  dout: int,
  *,
  axes: tuple[str | None, str | None],
  rngs: nnx.Rngs,
  use_bias: bool = True,
  kernel_init=torch_default_init,
  dtype=None,
) -> nnx.Linear:
  """nnx.Linear with PyTorch-default init, zero bias and logical sharding axes on the kernel."""
  return nnx.Linear(
    din,
    dout,
    use_bias=use_bias,
    kernel_init=nnx.with_partitioning(kernel_init, axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
    dtype=dtype,
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """RMSNorm with a learnable weight (init 1), computed in float32 (Mamba's triton RMSNorm)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * rms * self.weight[...]
