"""The FID InceptionV3: architecture against pytorch-fid's, the weight converter, resize, pools.

The reference architecture is written out below from torchvision's InceptionV3 layer list with
pytorch-fid's changes (1008 classes, no AuxLogits); its parameter count is computed from that list
and checked against the published figure. Random weights stand in for the real ones (none exist
offline); networks are built shape-only (nnx.eval_shape) and filled from NumPy, which is fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax.models import inception
from dim_jax.tools import convert_inception

# torchvision's inception_v3 has 27 161 264 parameters (its model card). The FID network drops
# AuxLogits (conv 768->128 1x1 + BN: 98 560; conv 128->768 5x5 + BN: 2 459 136; fc 768->1000:
# 769 000) and has 8 more classes (8 * 2049): 27 161 264 - 3 326 696 + 16 392.
PYTORCH_FID_PARAMS = 23_850_960


def _convs_a(name, cin, pool):
  return [
    (f"{name}.branch1x1", cin, 64, 1, 1),
    (f"{name}.branch5x5_1", cin, 48, 1, 1),
    (f"{name}.branch5x5_2", 48, 64, 5, 5),
    (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
    (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
    (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
    (f"{name}.branch_pool", cin, pool, 1, 1),
  ]


def _convs_c(name, c7):
  return [
    (f"{name}.branch1x1", 768, 192, 1, 1),
    (f"{name}.branch7x7_1", 768, c7, 1, 1),
    (f"{name}.branch7x7_2", c7, c7, 1, 7),
    (f"{name}.branch7x7_3", c7, 192, 7, 1),
    (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
    (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
    (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
    (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
    (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
    (f"{name}.branch_pool", 768, 192, 1, 1),
  ]


def _convs_e(name, cin):
  return [
    (f"{name}.branch1x1", cin, 320, 1, 1),
    (f"{name}.branch3x3_1", cin, 384, 1, 1),
    (f"{name}.branch3x3_2a", 384, 384, 1, 3),
    (f"{name}.branch3x3_2b", 384, 384, 3, 1),
    (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
    (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
    (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
    (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
    (f"{name}.branch_pool", cin, 192, 1, 1),
  ]


# (name, in channels, out channels, kernel height, kernel width) of every BasicConv2d.
REFERENCE_CONVS = [
  ("Conv2d_1a_3x3", 3, 32, 3, 3),
  ("Conv2d_2a_3x3", 32, 32, 3, 3),
  ("Conv2d_2b_3x3", 32, 64, 3, 3),
  ("Conv2d_3b_1x1", 64, 80, 1, 1),
  ("Conv2d_4a_3x3", 80, 192, 3, 3),
  *_convs_a("Mixed_5b", 192, 32),
  *_convs_a("Mixed_5c", 256, 64),
  *_convs_a("Mixed_5d", 288, 64),
  ("Mixed_6a.branch3x3", 288, 384, 3, 3),
  ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
  ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
  ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
  *_convs_c("Mixed_6b", 128),
  *_convs_c("Mixed_6c", 160),
  *_convs_c("Mixed_6d", 160),
  *_convs_c("Mixed_6e", 192),
  ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
  ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
  ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
  ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
  ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
  ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
  *_convs_e("Mixed_7b", 1280),
  *_convs_e("Mixed_7c", 2048),
]

# Output (H, W, C) of each stage at 299², from torchvision's shape comments.
REFERENCE_STAGES = {
  "Conv2d_1a_3x3": (149, 149, 32),
  "Conv2d_2a_3x3": (147, 147, 32),
  "Conv2d_2b_3x3": (147, 147, 64),
  "maxpool1": (73, 73, 64),
  "Conv2d_3b_1x1": (73, 73, 80),
  "Conv2d_4a_3x3": (71, 71, 192),
  "maxpool2": (35, 35, 192),
  "Mixed_5b": (35, 35, 256),
  "Mixed_5c": (35, 35, 288),
  "Mixed_5d": (35, 35, 288),
  "Mixed_6a": (17, 17, 768),
  "Mixed_6b": (17, 17, 768),
  "Mixed_6c": (17, 17, 768),
  "Mixed_6d": (17, 17, 768),
  "Mixed_6e": (17, 17, 768),
  "Mixed_7a": (8, 8, 1280),
  "Mixed_7b": (8, 8, 2048),
  "Mixed_7c": (8, 8, 2048),
}


def _reference_state_shapes() -> dict[str, tuple]:
  """pytorch-fid's FID Inception state dict: key -> shape (BatchNorm counters included)."""
  shapes = {}
  for name, cin, cout, kh, kw in REFERENCE_CONVS:
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{leaf}"] = (cout,)
    shapes[f"{name}.bn.num_batches_tracked"] = ()
  shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
  return shapes


def _reference_param_count() -> int:
  convs = sum(cout * cin * kh * kw + 2 * cout for _, cin, cout, kh, kw in REFERENCE_CONVS)
  return convs + 2048 * 1008 + 1008


def _random_state_dict(rng) -> dict[str, np.ndarray]:
  state = {}
  for key, shape in _reference_state_shapes().items():
    if key.endswith("num_batches_tracked"):
      state[key] = np.asarray(7, np.int64)
    elif key.endswith("running_var") or key.endswith("bn.weight"):
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif len(shape) == 4:  # He-scaled so activations stay O(1) through 94 layers
      fan_in = np.prod(shape[1:])
      state[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:
      state[key] = (rng.normal(size=shape) * 0.05).astype(np.float32)
  return state


def _abstract_network():
  return nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A random reference state dict and its converted .npz."""
  seed = np.random.SeedSequence().entropy
  state = _random_state_dict(np.random.default_rng(seed))
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  np.savez(path, **convert_inception.convert_state_dict(state))
  return state, path, seed


def test_parameter_count_equals_pytorch_fid():
  params = nnx.state(_abstract_network(), nnx.Param)
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  assert _reference_param_count() == PYTORCH_FID_PARAMS
  assert count == PYTORCH_FID_PARAMS


def test_stage_shapes_at_299():
  graphdef, state = nnx.split(_abstract_network())
  x = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
  stages = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).stages(x), state, x)
  assert {k: v.shape[1:] for k, v in stages.items() if k != "pool"} == REFERENCE_STAGES
  assert stages["pool"].shape == (2, 2048)


@pytest.mark.parametrize("shape", [(3, 32, 32, 1), (2, 256, 256, 3)])
def test_feature_shapes_for_any_input_size(shape):
  graphdef, state = nnx.split(_abstract_network())
  images = jax.ShapeDtypeStruct(shape, jnp.uint8)
  fn = lambda s, x: nnx.merge(graphdef, s).features(inception.prepare_images(x))
  out = jax.eval_shape(fn, state, images)
  batch = shape[0]
  assert {k: v.shape for k, v in out.items()} == {
    "pool": (batch, 2048),
    "spatial": (batch, 17 * 17 * 7),
    "logits": (batch, 1008),
  }


def test_converter_maps_every_key(weights):
  state, path, seed = weights
  converted = convert_inception.convert_state_dict(state)
  assert set(converted) == set(inception.weight_shapes())
  expected = {}
  for name, *_ in REFERENCE_CONVS:
    expected[f"{name}.conv.kernel"] = np.einsum("oiyx->yxio", state[f"{name}.conv.weight"])
    expected[f"{name}.bn.scale"] = state[f"{name}.bn.weight"]
    expected[f"{name}.bn.bias"] = state[f"{name}.bn.bias"]
    expected[f"{name}.bn.mean"] = state[f"{name}.bn.running_mean"]
    expected[f"{name}.bn.var"] = state[f"{name}.bn.running_var"]
  expected["fc.kernel"], expected["fc.bias"] = state["fc.weight"].T, state["fc.bias"]
  assert set(expected) == set(converted)
  for key, value in expected.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=f"{key}, seed {seed}")


def test_converter_refuses_missing_misshaped_and_foreign_keys(weights):
  state, _, seed = weights
  rng = np.random.default_rng(seed)
  keys = [k for k in state if not k.endswith("num_batches_tracked")]
  victim = keys[rng.integers(len(keys))]
  missing = {k: v for k, v in state.items() if k != victim}
  with pytest.raises(ValueError, match=f"lacks {victim}"):
    convert_inception.convert_state_dict(missing)
  misshaped = dict(state, **{victim: np.zeros((*state[victim].shape, 2), np.float32)})
  with pytest.raises(ValueError, match=f"{victim} has shape"):
    convert_inception.convert_state_dict(misshaped)
  foreign = dict(state, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
    convert_inception.convert_state_dict(foreign)


def test_loader_fills_every_array_and_explains_missing_files(weights, tmp_path):
  state, path, seed = weights
  model = inception.load_inception(path)
  np.testing.assert_array_equal(
    model.Mixed_6d.branch1x1.conv.kernel[...][0, 0, 5, 9],
    state["Mixed_6d.branch1x1.conv.weight"][9, 5, 0, 0],
    err_msg=f"seed {seed}",
  )
  np.testing.assert_array_equal(
    model.Mixed_7c.branch_pool.bn.var[...], state["Mixed_7c.branch_pool.bn.running_var"]
  )
  with pytest.raises(ValueError, match="convert_inception"):
    inception.load_inception(str(tmp_path / "absent.npz"))
  with np.load(path) as arrays:
    partial = {k: arrays[k] for k in list(arrays.keys())[1:]}
  np.savez(tmp_path / "partial.npz", **partial)
  with pytest.raises(ValueError, match="missing"):
    inception.load_inception(str(tmp_path / "partial.npz"))


def test_forward_spatial_is_mixed_6d_1x1_branch_and_logits_have_no_bias(weights):
  _, path, seed = weights
  graphdef, state = nnx.split(inception.load_inception(path))

  @jax.jit  # one compile for the features and the independent read-out of the same stages
  def run(state, images):
    model = nnx.merge(graphdef, state)
    x = inception.prepare_images(images)
    branch = model.Mixed_6d.branch1x1(model.stages(x)["Mixed_6c"])  # (1, 17, 17, 192)
    return model.features(x), branch, model.fc.kernel[...], model.fc.bias[...]

  images = np.random.default_rng(seed).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  out, branch, kernel, bias = jax.tree.map(np.asarray, run(state, images))
  # mixed_6/conv = Mixed_6d's 1x1 branch (conv-BN-ReLU), first 7 channels, flattened (h, w, c).
  spatial = out["spatial"].reshape(17, 17, 7)
  np.testing.assert_allclose(spatial, branch[0, :, :, :7], rtol=1e-4, atol=1e-5, err_msg=str(seed))
  logits = out["pool"].astype(np.float64) @ kernel.astype(np.float64)
  scale = np.abs(logits).max()
  np.testing.assert_allclose(out["logits"], logits, atol=1e-5 * scale, err_msg=f"seed {seed}")
  assert np.abs(bias).max() > 100 * 1e-5 * scale, "the bias would hide in the tolerance"
  assert np.all(np.isfinite(out["pool"])) and np.std(out["pool"]) > 0


def _torch_bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
  """F.interpolate(mode="bilinear", align_corners=False) on (H, W), float64 loops."""

  def taps(n_in, n_out):
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, src - low

  rows, cols = taps(image.shape[0], size), taps(image.shape[1], size)
  out = np.zeros((size, size))
  for i in range(size):
    r0, r1, fr = rows[0][i], rows[1][i], rows[2][i]
    for j in range(size):
      c0, c1, fc = cols[0][j], cols[1][j], cols[2][j]
      top = (1 - fc) * image[r0, c0] + fc * image[r0, c1]
      bottom = (1 - fc) * image[r1, c0] + fc * image[r1, c1]
      out[i, j] = (1 - fr) * top + fr * bottom
  return out


@pytest.mark.parametrize("size_in, size_out", [(5, 13), (17, 7), (9, 9)])
def test_resize_matches_pytorch_bilinear(size_in, size_out):
  seed = np.random.SeedSequence().entropy
  image = np.random.default_rng(seed).normal(size=(size_in, size_in))
  got = inception.resize_bilinear(jnp.asarray(image, jnp.float32)[None, :, :, None], size_out)
  expected = _torch_bilinear_reference(image, size_out)
  np.testing.assert_allclose(got[0, :, :, 0], expected, atol=1e-5, err_msg=f"seed {seed}")


def test_prepare_images_scales_and_replicates_grey():
  images = np.zeros((2, 8, 8, 1), np.uint8)
  images[1] = 255
  out = np.asarray(inception.prepare_images(jnp.asarray(images)))
  assert out.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
  np.testing.assert_allclose(out[1], 1.0, atol=1e-6)


def _random_block(factory, rng):
  """A shape-only block filled from NumPy: fast, and BatchNorm variances positive."""
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  flat = []
  for path, v in nnx.to_flat_state(state):
    value = rng.uniform(0.5, 1.5, v.shape) if path[-1] == "var" else rng.normal(size=v.shape)
    flat.append((path, v.replace(jnp.asarray(value * (0.3 if len(v.shape) == 4 else 1.0)))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _pool_reference(x: np.ndarray, kind: str) -> np.ndarray:
  """3x3 stride-1 pool over the valid (unpadded) neighbours of each pixel, (H, W, C)."""
  h, w, _ = x.shape
  out = np.zeros_like(x)
  for i in range(h):
    for j in range(w):
      window = x[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].reshape(-1, x.shape[-1])
      out[i, j] = window.mean(0) if kind == "avg" else window.max(0)
  return out


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pool_branch_quirks(kind):
  # InceptionA/C/E_1 average only real pixels (count_include_pad=False); E_2 max-pools.
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  if kind == "avg":
    block = _random_block(lambda: inception.InceptionA(4, 8, rngs=nnx.Rngs(0)), rng)
  else:
    block = _random_block(lambda: inception.InceptionE(4, max_pool=True, rngs=nnx.Rngs(0)), rng)
  x = rng.normal(size=(1, 5, 5, 4)).astype(np.float32)
  out = np.asarray(block(jnp.asarray(x)))
  pooled = _pool_reference(x[0].astype(np.float64), kind)[None].astype(np.float32)
  expected = np.asarray(block.branch_pool(jnp.asarray(pooled)))
  width = expected.shape[-1]
  np.testing.assert_allclose(out[..., -width:], expected, rtol=1e-4, atol=1e-5, err_msg=str(seed))
