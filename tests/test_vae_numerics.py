"""The VAE's layers and the whole tiny-width VAE, loaded from PyTorch-layout weights, against a
float64 NumPy implementation (NCHW, the weights used as PyTorch uses them): conv kernels OIHW ->
HWIO, linear transposes, the original checkpoint's 1x1-conv q/k/v, the asymmetric stride-2
padding, nearest upsampling, GroupNorm(eps 1e-6), single-head attention; float32 and bfloat16."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax.models import vae_weights
from dim_jax.models.vae import (
  Attention,
  AutoencoderKL,
  Downsample,
  ResnetBlock,
  Upsample,
  VAEConfig,
)
from tests.test_vae_weights import diffusers_shapes

GROUPS = 4
TINY = VAEConfig(block_out_channels=(8, 16, 16, 16), norm_groups=GROUPS)


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _weights(shapes: dict, rng) -> dict:
  """PyTorch-style draws: weights N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²)."""
  state = {}
  for key, shape in shapes.items():
    if len(shape) > 1:
      state[key] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    else:
      state[key] = (key.endswith(".weight") and "norm" in key) + 0.1 * rng.standard_normal(shape)
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


# --- float64 NumPy, NCHW ----------------------------------------------------------------------


def conv(x, w, b, stride=1, pad=None):
  """PyTorch Conv2d: x (N, I, H, W), w (O, I, kh, kw); pad ((top, bottom), (left, right))."""
  k = w.shape[2]
  pad = ((k // 2, k // 2),) * 2 if pad is None else pad
  x = np.pad(x, ((0, 0), (0, 0), *pad))
  height, width = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], height, width))
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i : i + stride * height : stride, j : j + stride * width : stride]
      out += np.einsum("nihw,oi->nohw", patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def group_norm(x, gamma, beta, groups=GROUPS, eps=1e-6):
  n, c, h, w = x.shape
  g = x.reshape(n, groups, c // groups, h, w)
  g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(
    g.var(axis=(2, 3, 4), keepdims=True) + eps
  )
  return g.reshape(n, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None]


def silu(x):
  return x / (1.0 + np.exp(-x))


def resnet(x, sd, p, shortcut="conv_shortcut"):
  h = conv(
    silu(group_norm(x, sd[f"{p}norm1.weight"], sd[f"{p}norm1.bias"])),
    sd[f"{p}conv1.weight"],
    sd[f"{p}conv1.bias"],
  )
  h = conv(
    silu(group_norm(h, sd[f"{p}norm2.weight"], sd[f"{p}norm2.bias"])),
    sd[f"{p}conv2.weight"],
    sd[f"{p}conv2.bias"],
  )
  if f"{p}{shortcut}.weight" in sd:
    x = conv(x, sd[f"{p}{shortcut}.weight"], sd[f"{p}{shortcut}.bias"])
  return x + h


def softmax(logits):
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def attention_diffusers(x, sd, p):
  """diffusers' Attention on (N, C, H, W): linear projections of the H*W tokens."""
  n, c, h, w = x.shape
  t = group_norm(x, sd[f"{p}group_norm.weight"], sd[f"{p}group_norm.bias"]).reshape(n, c, h * w)
  t = t.transpose(0, 2, 1)  # (N, L, C)
  q, k, v = (t @ sd[f"{p}{m}.weight"].T + sd[f"{p}{m}.bias"] for m in ("to_q", "to_k", "to_v"))
  o = softmax(q @ k.transpose(0, 2, 1) / np.sqrt(c)) @ v
  o = o @ sd[f"{p}to_out.0.weight"].T + sd[f"{p}to_out.0.bias"]
  return x + o.transpose(0, 2, 1).reshape(n, c, h, w)


def attention_ldm(x, sd, p):
  """LDM's AttnBlock: q, k, v and proj_out are 1x1 convs on the feature map."""
  n, c, h, w = x.shape
  hn = group_norm(x, sd[f"{p}norm.weight"], sd[f"{p}norm.bias"])
  q, k, v = (conv(hn, sd[f"{p}{m}.weight"], sd[f"{p}{m}.bias"]).reshape(n, c, h * w) for m in "qkv")
  weights = softmax(np.einsum("nci,ncj->nij", q, k) * c**-0.5)  # (N, L_q, L_k)
  o = np.einsum("ncj,nij->nci", v, weights).reshape(n, c, h, w)
  return x + conv(o, sd[f"{p}proj_out.weight"], sd[f"{p}proj_out.bias"])


def upsample(x, sd, p):
  return conv(x.repeat(2, axis=2).repeat(2, axis=3), sd[f"{p}conv.weight"], sd[f"{p}conv.bias"])


def downsample(x, sd, p):
  return conv(x, sd[f"{p}conv.weight"], sd[f"{p}conv.bias"], stride=2, pad=((0, 1), (0, 1)))


def mid(x, sd, p):
  x = resnet(x, sd, f"{p}resnets.0.")
  return resnet(attention_diffusers(x, sd, f"{p}attentions.0."), sd, f"{p}resnets.1.")


def encoder(x, sd, cfg):
  x = conv(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"])
  for i in range(len(cfg.block_out_channels)):
    for j in range(cfg.layers_per_block):
      x = resnet(x, sd, f"encoder.down_blocks.{i}.resnets.{j}.")
    if f"encoder.down_blocks.{i}.downsamplers.0.conv.weight" in sd:
      x = downsample(x, sd, f"encoder.down_blocks.{i}.downsamplers.0.")
  x = mid(x, sd, "encoder.mid_block.")
  x = silu(group_norm(x, sd["encoder.conv_norm_out.weight"], sd["encoder.conv_norm_out.bias"]))
  x = conv(x, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])
  return conv(x, sd["quant_conv.weight"], sd["quant_conv.bias"])  # moments (N, 2 * latent, h, w)


def decoder(z, sd, cfg):
  x = conv(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
  x = mid(
    conv(x, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"]), sd, "decoder.mid_block."
  )
  for i in range(len(cfg.block_out_channels)):
    for j in range(cfg.layers_per_block + 1):
      x = resnet(x, sd, f"decoder.up_blocks.{i}.resnets.{j}.")
    if f"decoder.up_blocks.{i}.upsamplers.0.conv.weight" in sd:
      x = upsample(x, sd, f"decoder.up_blocks.{i}.upsamplers.0.")
  x = silu(group_norm(x, sd["decoder.conv_norm_out.weight"], sd["decoder.conv_norm_out.bias"]))
  return conv(x, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"])


# --- tests ------------------------------------------------------------------------------------


def _nchw(x):
  return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def _rel_err(out, ref):
  """Largest error relative to the largest reference value."""
  return float(np.max(np.abs(_nchw(out) - ref)) / np.max(np.abs(ref)))


def _rms_err(out, ref):
  """RMS error relative to the RMS of the reference: bfloat16 rounds every conv's input and
  weights (2^-9 RMS each), so some 25 convs deep an RMS error of 1-3 % is expected."""
  return float(np.linalg.norm(_nchw(out) - ref) / np.linalg.norm(ref))


def _conv_shapes(prefix, cout, cin, k):
  return {f"{prefix}weight": (cout, cin, k, k), f"{prefix}bias": (cout,)}


def _resnet_shapes(cin, cout, shortcut):
  shapes = {f"norm1.{s}": (cin,) for s in ("weight", "bias")}
  shapes |= {f"norm2.{s}": (cout,) for s in ("weight", "bias")}
  shapes |= _conv_shapes("conv1.", cout, cin, 3) | _conv_shapes("conv2.", cout, cout, 3)
  return shapes | _conv_shapes(f"{shortcut}.", cout, cin, 1)


def _attention_shapes(c, naming):
  if naming == "ldm":
    shapes = {f"norm.{s}": (c,) for s in ("weight", "bias")}
    for m in ("q", "k", "v", "proj_out"):
      shapes |= _conv_shapes(f"{m}.", c, c, 1)  # (C, C, 1, 1)
    return shapes
  shapes = {f"group_norm.{s}": (c,) for s in ("weight", "bias")}
  for m in ("to_q", "to_k", "to_v", "to_out.0"):
    shapes |= {f"{m}.weight": (c, c), f"{m}.bias": (c,)}  # nn.Linear (out, in)
  return shapes


LAYERS = {  # name: (module factory, torch-layout shapes, naming, NumPy reference)
  "downsample": (
    lambda rngs: Downsample(16, dtype=jnp.float32, rngs=rngs),
    _conv_shapes("conv.", 16, 16, 3),
    "diffusers",
    lambda x, sd: downsample(x, sd, ""),
  ),
  "upsample": (
    lambda rngs: Upsample(16, dtype=jnp.float32, rngs=rngs),
    _conv_shapes("conv.", 16, 16, 3),
    "diffusers",
    lambda x, sd: upsample(x, sd, ""),
  ),
  "resnet_diffusers": (
    lambda rngs: ResnetBlock(16, 24, GROUPS, dtype=jnp.float32, rngs=rngs),
    _resnet_shapes(16, 24, "conv_shortcut"),
    "diffusers",
    lambda x, sd: resnet(x, sd, ""),
  ),
  "resnet_ldm": (
    lambda rngs: ResnetBlock(16, 24, GROUPS, dtype=jnp.float32, rngs=rngs),
    _resnet_shapes(16, 24, "nin_shortcut"),
    "ldm",
    lambda x, sd: resnet(x, sd, "", shortcut="nin_shortcut"),
  ),
  "attention_diffusers": (
    lambda rngs: Attention(16, GROUPS, dtype=jnp.float32, rngs=rngs),
    _attention_shapes(16, "diffusers"),
    "diffusers",
    lambda x, sd: attention_diffusers(x, sd, ""),
  ),
  "attention_ldm_1x1_conv": (
    lambda rngs: Attention(16, GROUPS, dtype=jnp.float32, rngs=rngs),
    _attention_shapes(16, "ldm"),
    "ldm",
    lambda x, sd: attention_ldm(x, sd, ""),
  ),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_matches_numpy(layer):
  make, shapes, naming, reference = LAYERS[layer]
  rng, seed = _rng()
  sd = _weights(shapes, rng)
  module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  vae_weights.load_state_dict(module, sd, naming=naming)
  x = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)  # (B, H, W, C), not square
  out = np.asarray(module(jnp.asarray(x)))
  ref = reference(_nchw(x), {k: v.astype(np.float64) for k, v in sd.items()})
  assert _nchw(out).shape == ref.shape, (out.shape, ref.shape)
  assert _rel_err(out, ref) < 2e-5, f"{layer}: error {_rel_err(out, ref):.2e}, seed {seed}"


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 6e-2)])
def test_whole_vae_matches_numpy(dtype, tol):
  """Encode (posterior moments) and decode of a tiny-width VAE of the same architecture."""
  rng, seed = _rng()
  sd = _weights(diffusers_shapes(TINY), rng)
  vae = nnx.eval_shape(lambda: AutoencoderKL(TINY, dtype=dtype, rngs=nnx.Rngs(0)))
  vae_weights.load_state_dict(vae, sd)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}

  images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  posterior = nnx.jit(lambda vae, x: vae.encode(x))(vae, jnp.asarray(images))
  moments = encoder(_nchw(images), sd64, TINY)
  for name, got, want in (
    ("mean", posterior.mean, moments[:, :4]),
    ("logvar", posterior.logvar, moments[:, 4:]),
  ):
    assert got.dtype == jnp.float32 and _nchw(got).shape == want.shape, name
    err = _rms_err(got, np.clip(want, -30, 20))
    assert err < tol, f"{name} ({dtype.__name__}): error {err:.2e}, seed {seed}"

  latents = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
  decoded = nnx.jit(lambda vae, z: vae.decode(z))(vae, jnp.asarray(latents))
  want = decoder(_nchw(latents), sd64, TINY)
  assert decoded.dtype == jnp.float32 and _nchw(decoded).shape == want.shape == (2, 3, 24, 16)
  err = _rms_err(decoded, want)
  assert err < tol, f"decode ({dtype.__name__}): error {err:.2e}, seed {seed}"
