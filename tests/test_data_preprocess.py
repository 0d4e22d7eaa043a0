"""ADM centre crop, flip and scaling against hand-computed values."""

import numpy as np
import pytest
from PIL import Image

from dim_jax.data import preprocess


def _fresh_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**31)


# 4 x 6 grayscale image: its 2x2 blocks average to whole numbers.
EXAMPLE = np.array(
  [
    [0, 4, 10, 20, 100, 104],
    [8, 12, 30, 40, 108, 112],
    [200, 204, 50, 50, 7, 9],
    [208, 212, 50, 50, 11, 13],
  ],
  np.uint8,
)
# By hand, crop to 2: the short side 4 >= 2 * 2, so 2x2 box means [[6, 25, 106], [206, 50, 10]];
# now 2 < 2 * 2 and the scale is 2 / 2 = 1; the central 2 of 3 columns start at (3 - 2) // 2 = 0.
EXAMPLE_CROP = np.array([[6, 25], [206, 50]])
# Flipped: [[25, 6], [50, 206]]; x / 127.5 - 1:
EXAMPLE_FLIPPED_SCALED = np.array([[-0.8039215686, -0.9529411765], [-0.6078431373, 0.6156862745]])


def test_crop_flip_scale_match_the_hand_computed_example():
  crop = preprocess.adm_center_crop(Image.fromarray(EXAMPLE), 2)
  np.testing.assert_array_equal(crop, EXAMPLE_CROP)
  flipped = preprocess.RandomFlip()
  for position in range(64):  # some draws flip, some do not
    example = {"image": crop[..., None], "label": 0}
    out = flipped.random_map(example, np.random.default_rng(position))["image"][..., 0]
    if out[0, 0] == 25:
      scaled = preprocess.to_unit_range(out)
      np.testing.assert_allclose(scaled, EXAMPLE_FLIPPED_SCALED, atol=1e-7)
      assert scaled.dtype == np.float32
      break
  else:
    pytest.fail("64 positions never flipped")


def test_box_halving_then_centre_columns_on_random_images():
  """(2h, 2w + 2k) image, crop h: box means, then the central h columns of w + k."""
  rng = np.random.default_rng(seed := _fresh_seed())
  size, extra = int(rng.integers(2, 9)), int(rng.integers(0, 5))
  # Blocks of base +- d: every 2x2 block sums to 4 * base, so the box mean is exactly base.
  base = rng.integers(10, 245, size=(size, size + extra, 3))
  sign = np.array([[1, -1], [-1, 1]])[:, :, None]
  d = rng.integers(0, 10, size=(size, size + extra, 3))
  image = np.zeros((2 * size, 2 * (size + extra), 3), np.int64)
  for a in range(2):
    for b in range(2):
      image[a::2, b::2] = base + sign[a, b] * d
  crop = preprocess.adm_center_crop(Image.fromarray(image.astype(np.uint8)), size)
  left = extra // 2
  np.testing.assert_array_equal(crop, base[:, left : left + size], err_msg=f"seed={seed}")


def test_upscaled_and_long_side_shapes_and_constant_images_stay_constant():
  rng = np.random.default_rng(seed := _fresh_seed())
  height, width = (int(v) for v in rng.integers(3, 40, size=2))
  colour = rng.integers(0, 256, size=3).astype(np.uint8)
  image = np.broadcast_to(colour, (height, width, 3)).copy()
  crop = preprocess.adm_center_crop(Image.fromarray(image), 16)
  assert crop.shape == (16, 16, 3), f"seed={seed} from {height}x{width}"
  np.testing.assert_array_equal(crop, np.broadcast_to(colour, (16, 16, 3)), err_msg=f"seed={seed}")


def test_pad_centres_the_image_in_zeros():
  image = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28, 1) % 251 + 1
  padded = preprocess.pad_to_size(image.astype(np.uint8), 32)
  assert padded.shape == (32, 32, 1)
  np.testing.assert_array_equal(padded[2:30, 2:30], image)
  assert padded.sum() == image.sum()  # the 2-pixel border is zero
  with pytest.raises(ValueError, match="image_size=20"):
    preprocess.pad_to_size(image.astype(np.uint8), 20)


def test_scale_maps_0_and_255_to_minus_one_and_one():
  out = preprocess.to_unit_range(np.array([0, 255, 51], np.uint8))
  np.testing.assert_allclose(out, [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-7)
