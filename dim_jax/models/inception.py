"""The FID network: InceptionV3 as pytorch-fid builds it ("pt_inception-2015-12-05"), Flax NNX.

This is TensorFlow's 2015-12-05 Inception graph that FID (Heusel et al. 2017) was defined on, as
pytorch-fid ports it on top of torchvision's InceptionV3 (Szegedy et al. 2016). It differs from
torchvision's ImageNet network in four places, all kept here:
  - 1008 output classes (TensorFlow's label map), no auxiliary classifier;
  - the average pools inside the Mixed blocks ignore the zero padding (count_include_pad=False),
    as TensorFlow's pools do;
  - the last block (Mixed_7c) pools its fourth branch with a 3x3 *max* pool, not an average;
  - BatchNorm epsilon 1e-3, convolutions without biases.
Module and attribute names equal the PyTorch state-dict names (Mixed_5b.branch1x1.conv, ...), so
the converter (dim_jax/tools/convert_inception.py) maps keys one to one.

Outputs, for uint8 images of any size (resized to 299² as pytorch-fid does it):
  pool    (B, 2048)  the final average pool, "pool_3" -> FID, precision / recall;
  spatial (B, 2023)  the first 7 channels of "mixed_6/conv" (17x17), flattened in (h, w, c) order,
                     as ADM's evaluator takes them -> sFID (Nash et al. 2021);
  logits  (B, 1008)  pool @ W of the classifier *without* its bias, as improved-GAN's and ADM's
                     Inception Score take them -> IS (Salimans et al. 2016).
"mixed_6" is TensorFlow's seventh mixed block (PyTorch's Mixed_6d) and "mixed_6/conv" its 1x1
branch, whose output is the first 192 channels of Mixed_6d's concatenation.

Weights come only from a local `.npz` made by the converter; nothing is downloaded. Checked once
against pytorch-fid 0.3.0 itself (torch 1.13, torchvision 0.14), random weights through the
converter, uint8 inputs of 64², 299² and 320²: pool and logits agree to 2.6e-6 and spatial to
1.5e-5 of their largest magnitude.

FID here is pytorch-fid's number (the protocol of U-ViT and DiM: 50 000 PNG samples against U-ViT's
fid_stats_*.npz). ADM's evaluator runs the TensorFlow graph itself, which resizes with TF1's
ResizeBilinear (no half-pixel centres) and scales inputs as x / 128 - 1, so sFID, precision and
recall against ADM's reference batches may differ slightly from the numbers ADM's script prints.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_SIZE = 299  # pytorch-fid resizes every input to 299x299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM's evaluator keeps mixed_6/conv[..., :7] for sFID
HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes: features must not depend on the chip
WEIGHTS_HELP = (
  "make it with `python -m dim_jax.tools.convert_inception pt_inception-2015-12-05-6726825d.pth "
  "OUT.npz` (the .pth is pytorch-fid's release asset 'fid_weights'; converting needs torch)"
)


MIXED_BLOCKS = (
  *("Mixed_5b", "Mixed_5c", "Mixed_5d"),  # 35x35
  *("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),  # 17x17
  *("Mixed_7a", "Mixed_7b", "Mixed_7c"),  # 8x8
)


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nnx.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(
      cin,
      cout,
      _pair(kernel),
      strides=stride,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=HIGHEST,
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3, stride 1, pad 1, averaging only the real (unpadded) inputs, as TensorFlow's pool."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nnx.Module):
  """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = ConvBN(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = ConvBN(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block (Mixed_6b..e) with factorised 7x7s: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | pool."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for conv in (
      self.branch7x7dbl_1,
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      bd = conv(bd)
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block (Mixed_7b/c), split 1x3 / 3x1 heads; `max_pool` marks the FID graph's Mixed_7c."""

  def __init__(self, cin: int, *, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = ConvBN(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = ConvBN(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    if self.max_pool:  # the 2015-12-05 graph's quirk (pytorch-fid's FIDInceptionE_2)
      pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """(B, 299, 299, 3) in [-1, 1] -> every stage's output; see `features` for the FID outputs."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
    self.fc = nnx.Linear(2048, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

  def stages(self, x: jax.Array) -> dict[str, jax.Array]:
    """Named outputs in order; at 299²: 149, 147, 147, 73, 73, 71, 35, 35x3, 17x5, 8x3, 1."""
    out = {}
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
      x = out[name] = getattr(self, name)(x)
    x = out["maxpool1"] = _max_pool_3x3_s2(x)  # (B, 73, 73, 64)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
      x = out[name] = getattr(self, name)(x)
    x = out["maxpool2"] = _max_pool_3x3_s2(x)  # (B, 35, 35, 192)
    for name in MIXED_BLOCKS:
      x = out[name] = getattr(self, name)(x)
    out["pool"] = jnp.mean(x, axis=(1, 2))  # (B, 2048): pool_3
    return out

  def features(self, x: jax.Array) -> dict[str, jax.Array]:
    """(B, 299, 299, 3) in [-1, 1] -> pool (B, 2048), spatial (B, 2023), logits (B, 1008)."""
    out = self.stages(x)
    # mixed_6/conv is Mixed_6d's 1x1 branch, the first 192 channels of its output.
    spatial = out["Mixed_6d"][..., :SPATIAL_CHANNELS]  # (B, 17, 17, 7)
    pool = out["pool"]
    logits = jnp.dot(pool, self.fc.kernel[...], precision=HIGHEST)  # no bias (improved-GAN IS)
    return dict(pool=pool, spatial=spatial.reshape(len(pool), -1), logits=logits)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    return self.features(x)


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C), as torch's F.interpolate(bilinear, align_corners=False).

  Half-pixel centres and two-tap interpolation with no antialiasing, also when shrinking: that is
  what pytorch-fid does, so the features (and the FID) match its numbers.
  """
  batch, _, _, channels = images.shape
  return jax.image.resize(images, (batch, size, size, channels), "bilinear", antialias=False)


def prepare_images(images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, 1 or 3) -> (B, 299, 299, 3) float32 in [-1, 1], as pytorch-fid.

  pytorch-fid reads PNGs as RGB in [0, 1], resizes bilinearly to 299², then maps to 2x - 1; the
  maps are affine, so resizing after the scaling gives the same numbers. Grey images are
  replicated to three channels, as PIL's convert("RGB") does.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Inception input of shape {images.shape}: give (B, H, W, 1 or 3) images.")
  x = images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  x = jnp.broadcast_to(x, (*x.shape[:3], 3))
  return resize_bilinear(x, FID_SIZE)


def make_feature_fn(model: InceptionV3):
  """uint8 (B, H, W, C) -> {'pool', 'spatial', 'logits'}, jitted: eval_metrics' feature_fn.

  Shard the input batch over devices and jit places the (replicated) network with it.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def features(state, images):
    return nnx.merge(graphdef, state).features(prepare_images(images))

  return lambda images: features(state, images)


def _abstract_network():
  """(graphdef, flat state of shape-only variables): the network without computing any init."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  return graphdef, nnx.to_flat_state(state)


def weight_shapes() -> dict[str, tuple[int, ...]]:
  """Every array the weights file holds (parameters and BatchNorm statistics) -> its shape."""
  return {".".join(map(str, path)): v.shape for path, v in _abstract_network()[1]}


def load_inception(path: str) -> InceptionV3:
  """The network with the weights of a converter-made `.npz` (keys: NNX paths joined by '.')."""
  if not os.path.isfile(path):
    raise ValueError(f"Inception weights {path!r} not found: {WEIGHTS_HELP}.")
  graphdef, flat = _abstract_network()
  filled = []
  with np.load(path) as weights:
    for key_path, variable in flat:
      key = ".".join(map(str, key_path))
      if key not in weights or weights[key].shape != variable.shape:
        found = weights[key].shape if key in weights else "missing"
        raise ValueError(
          f"{path!r}: {key} is {found}, expected {variable.shape}; remake it: {WEIGHTS_HELP}."
        )
      filled.append((key_path, variable.replace(jnp.asarray(weights[key], jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))
