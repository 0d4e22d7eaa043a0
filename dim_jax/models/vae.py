"""The Stable Diffusion KL-f8 autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", §3 and App. G) in Flax NNX, NHWC.

    images (B, H, W, 3) in [-1, 1]
      -> encoder -> quant_conv -> moments (B, H/8, W/8, 8) = (mean, logvar)   # DiagonalGaussian
    z (B, H/8, W/8, 4)
      -> post_quant_conv -> decoder -> images (B, H, W, 3), float32, NOT clipped

Encoder: conv_in -> down blocks (2 ResNet blocks each, then a stride-2 conv except after the last)
-> mid block (ResNet, single-head self-attention, ResNet) -> GroupNorm, SiLU -> conv_out (2 x 4
channels: mean and log-variance). Decoder: conv_in -> mid block -> up blocks (3 ResNet blocks
each, then nearest x2 + conv except after the last) -> GroupNorm, SiLU -> conv_out. Every
GroupNorm has 32 groups and eps 1e-6. Module names follow diffusers' `AutoencoderKL`, so that
`vae_weights` maps checkpoint keys by a few renaming rules.

Latent diffusion runs on z * LATENT_SCALE (0.18215, chosen in LDM so that the latents have about
unit variance); `encode_latents` and `decode_latents` are the only places that apply it.

Range: `decode` returns the raw decoder output; it is trained towards [-1, 1] but is not clipped
(overshoots of a few percent are normal). `to_images` clips it to [-1, 1].

Precision: parameters are float32; `dtype` (float32 or bfloat16) is the type of conv and matmul
inputs and outputs. The residual stream (skip + block output), GroupNorm statistics, attention
logits and softmax are float32, as under PyTorch autocast; with bfloat16 the encoder's moments
keep about half the rounding error they have with a bfloat16 residual stream. The posterior
moments and the decoded images are returned in float32 whatever `dtype` is.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dim_jax import parallel

LATENT_SCALE = 0.18215
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of LDM's DiagonalGaussianDistribution


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture; the defaults are Stable Diffusion's KL-f8 autoencoder."""

  in_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_groups: int = 32
  scaling_factor: float = LATENT_SCALE

  def __post_init__(self):
    bad = [c for c in self.block_out_channels if c % self.norm_groups]
    if bad or not self.block_out_channels:
      raise ValueError(
        f"VAEConfig.block_out_channels={self.block_out_channels}: every width must be a "
        f"multiple of norm_groups={self.norm_groups}; change one of the two."
      )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


SD_KL_F8 = VAEConfig()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiagonalGaussian:
  """The posterior q(z | x) = N(mean, exp(logvar)), each (B, h, w, latent_channels) float32."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation)."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean


def _conv(cin, cout, kernel, *, dtype, rngs, strides=1, padding=None) -> nnx.Conv:
  """A PyTorch-style Conv2d: kernel (k, k, cin, cout), symmetric padding k // 2 by default."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nnx.Conv(
    cin, cout, (kernel, kernel), strides=strides, padding=padding, dtype=dtype, rngs=rngs
  )


def _group_norm(channels: int, groups: int, *, dtype, rngs) -> nnx.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits where |mean| >> std, as it can in a deep
  # residual stream.
  return nnx.GroupNorm(
    channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype, rngs=rngs
  )


class ResnetBlock(nnx.Module):
  """x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), with a 1x1 conv on x when the width changes; the
  sum is float32."""

  def __init__(self, cin: int, cout: int, groups: int, *, dtype, rngs: nnx.Rngs):
    self.norm1 = _group_norm(cin, groups, dtype=dtype, rngs=rngs)
    self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    self.norm2 = _group_norm(cout, groups, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, cin) -> (B, H, W, cout)
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip.astype(jnp.float32) + h


class Attention(nnx.Module):
  """Single-head self-attention over all H*W positions with a residual: x + out(softmax(q k^T /
  sqrt(C)) v), q, k, v = linear projections of GN(x)."""

  def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
    self.group_norm = _group_norm(channels, groups, dtype=dtype, rngs=rngs)
    linear = functools.partial(nnx.Linear, channels, channels, dtype=dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()

  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C)
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)  # (B, L, C)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)  # (B, L, L)
    weights = jax.nn.softmax(logits * c**-0.5, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", weights, v))  # (B, L, C)
    return x.astype(jnp.float32) + out.reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after zero-padding one row at the bottom and one column at the right."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(
      channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, H/2, W/2, C)
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, 2H, 2W, C)
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return self.conv(x.reshape(b, 2 * h, 2 * w, c))


def _resnet_stack(cin, cout, num_resnets, groups, *, dtype, rngs) -> nnx.List:
  """ResNet blocks cin -> cout -> ... -> cout."""
  widths = [cin] + [cout] * num_resnets
  return nnx.List(
    [
      ResnetBlock(i, o, groups, dtype=dtype, rngs=rngs)
      for i, o in zip(widths[:-1], widths[1:], strict=True)
    ]
  )


class DownBlock(nnx.Module):
  def __init__(self, cin, cout, num_resnets, groups, add_downsample, *, dtype, rngs):
    self.resnets = _resnet_stack(cin, cout, num_resnets, groups, dtype=dtype, rngs=rngs)
    self.downsample = Downsample(cout, dtype=dtype, rngs=rngs) if add_downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  def __init__(self, cin, cout, num_resnets, groups, add_upsample, *, dtype, rngs):
    self.resnets = _resnet_stack(cin, cout, num_resnets, groups, dtype=dtype, rngs=rngs)
    self.upsample = Upsample(cout, dtype=dtype, rngs=rngs) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsample is None else self.upsample(x)


class MidBlock(nnx.Module):
  """ResNet block, self-attention, ResNet block, at the lowest resolution."""

  def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
    block = functools.partial(ResnetBlock, channels, channels, groups, dtype=dtype, rngs=rngs)
    self.resnets = nnx.List([block(), block()])
    self.attentions = nnx.List([Attention(channels, groups, dtype=dtype, rngs=rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
    widths, groups = cfg.block_out_channels, cfg.norm_groups
    self.conv_in = _conv(cfg.in_channels, widths[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List(
      [
        DownBlock(
          widths[max(i - 1, 0)],
          widths[i],
          cfg.layers_per_block,
          groups,
          i < len(widths) - 1,
          dtype=dtype,
          rngs=rngs,
        )
        for i in range(len(widths))
      ]
    )
    self.mid_block = MidBlock(widths[-1], groups, dtype=dtype, rngs=rngs)
    self.conv_norm_out = _group_norm(widths[-1], groups, dtype=dtype, rngs=rngs)
    self.conv_out = _conv(widths[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):  # (B, H, W, in) -> (B, H/f, W/f, 2 * latent)
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
    widths, groups = cfg.block_out_channels[::-1], cfg.norm_groups
    self.conv_in = _conv(cfg.latent_channels, widths[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(widths[0], groups, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List(
      [
        UpBlock(
          widths[max(i - 1, 0)],
          widths[i],
          cfg.layers_per_block + 1,
          groups,
          i < len(widths) - 1,
          dtype=dtype,
          rngs=rngs,
        )
        for i in range(len(widths))
      ]
    )
    self.conv_norm_out = _group_norm(widths[-1], groups, dtype=dtype, rngs=rngs)
    self.conv_out = _conv(widths[-1], cfg.in_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z):  # (B, h, w, latent) -> (B, h*f, w*f, in)
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised autoencoder: `encode` -> posterior, `decode` -> images (see the module
  docstring for shapes, range and precision)."""

  def __init__(self, config: VAEConfig = SD_KL_F8, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    latent = config.latent_channels
    self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
    self.quant_conv = _conv(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = _conv(latent, latent, 1, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

  def _check(self, x: jax.Array, channels: int, what: str, factor: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
        f"VAE {what} of shape {tuple(x.shape)}: expected NHWC (B, H, W, {channels}) with H and W "
        f"multiples of {factor}; crop or pad the input to such a size."
      )

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """(B, H, W, 3) in [-1, 1] -> q(z | x) over (B, H/8, W/8, 4) latents (unscaled)."""
    self._check(images, self.config.in_channels, "input", self.config.downsample_factor)
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)  # (B, h, w, 2 * latent)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  def decode(self, z: jax.Array) -> jax.Array:
    """(B, h, w, 4) unscaled latents -> (B, 8h, 8w, 3) float32 images, unclipped."""
    self._check(z, self.config.latent_channels, "latent", 1)
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def encode_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images -> the latents diffusion runs on: a posterior sample (its mode if key is None)
    times the scaling factor."""
    posterior = self.encode(images)
    z = posterior.mode() if key is None else posterior.sample(key)
    return z * self.config.scaling_factor

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """The inverse of `encode_latents`: divides by the scaling factor, then decodes."""
    return self.decode(latents / self.config.scaling_factor)


def random_vae(config: VAEConfig = SD_KL_F8, *, dtype=jnp.float32, seed: int = 0) -> AutoencoderKL:
  """A VAE with N(0, 1/fan_in) parameters drawn by NumPy, for benchmarks and tests (real use
  loads weights: `vae_weights.load_vae`). Quicker than NNX's init at any size: eager init
  compiles one program per parameter shape, a jitted one compiles for a minute on a CPU."""
  vae = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def draw(x):  # fan_in = every axis but the last (kernels (kh, kw, I, O), (I, O)); 1 for vectors
    std = 1.0 / np.sqrt(np.prod(x.shape[:-1]))
    return jnp.asarray(std * rng.standard_normal(x.shape, dtype=np.float32))

  nnx.update(vae, jax.tree.map(draw, nnx.state(vae, nnx.Param)))
  return vae


def to_images(decoded: jax.Array) -> jax.Array:
  """Decoder output -> images clipped to [-1, 1] (what a sampler should save or score)."""
  return jnp.clip(decoded, -1.0, 1.0)


def _placed(vae: AutoencoderKL, mesh):
  """(graphdef, params, in/out shardings): params replicated and data split over the batch
  axes of `mesh` (dim_jax.parallel), or left where they are when mesh is None."""
  graphdef, params = nnx.split(vae)
  if mesh is None:
    return graphdef, params, {}
  params = jax.device_put(params, parallel.replicated(mesh))
  batch = parallel.batch_sharding(mesh)
  return (
    graphdef,
    params,
    dict(in_shardings=(parallel.replicated(mesh), batch), out_shardings=batch),
  )


def make_moments_fn(vae: AutoencoderKL, mesh=None):
  """A jitted images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, 4) float32:
  the `encoder` that `tools.extract_latents` calls. With a mesh, B is split over its batch axes."""
  graphdef, params, shardings = _placed(vae, mesh)

  @functools.partial(jax.jit, **shardings)
  def moments(params, images):
    posterior = nnx.merge(graphdef, params).encode(images)
    return posterior.mean, posterior.logvar

  return functools.partial(moments, params)


def make_decode_fn(vae: AutoencoderKL, mesh=None):
  """A jitted scaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3) float32 clipped to [-1, 1]:
  what sampling and evaluation apply to the diffusion model's x0. With a mesh, B is split."""
  graphdef, params, shardings = _placed(vae, mesh)

  @functools.partial(jax.jit, **shardings)
  def decode(params, latents):
    return to_images(nnx.merge(graphdef, params).decode_latents(latents))

  return functools.partial(decode, params)
