"""NumPy / PIL preprocessing of images, as in ADM (Dhariwal & Nichol 2021) and DiM's training.

Every function here is pure NumPy or PIL (never JAX), so grain may run them in worker processes.
"""

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
  """ADM's centre crop: PIL image of any size -> uint8 (image_size, image_size, C).

  The shorter side is first halved with a box filter while it is at least twice `image_size`
  (cheap anti-aliasing), then resized with bicubic interpolation so that it equals
  `image_size`; the central square is cut out of the longer side.
  """
  while min(image.size) >= 2 * image_size:
    image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
  array = np.asarray(image)
  top = (array.shape[0] - image_size) // 2
  left = (array.shape[1] - image_size) // 2
  return array[top : top + image_size, left : left + image_size]


def pad_to_size(image: np.ndarray, image_size: int) -> np.ndarray:
  """Zero-pads a uint8 (H, W, C) image evenly on all sides to (image_size, image_size, C)."""
  height, width = image.shape[:2]
  if height > image_size or width > image_size:
    raise ValueError(f"cannot pad a {height}x{width} image to image_size={image_size}.")
  top, left = (image_size - height) // 2, (image_size - width) // 2
  pad = ((top, image_size - height - top), (left, image_size - width - left), (0, 0))
  return np.pad(image, pad)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (ADM: x / 127.5 - 1)."""
  return images.astype(np.float32) / 127.5 - 1.0


def example_rng(seed: int, position: int) -> np.random.Generator:
  """The random stream of one example: a function of (seed, global stream position) only.

  Keyed by position in the endless global stream (not by the example), so an example gets a
  fresh flip / posterior sample every epoch, a restored iterator draws the same numbers, and
  every process count draws the same numbers for the same row of the same global batch.
  """
  return np.random.default_rng((seed, position))


class RandomFlip:
  """grain map_with_index transform: horizontal flip of example["image"] with probability 1/2."""

  def __init__(self, seed: int, enabled: bool = True):
    self.seed, self.enabled = seed, enabled

  def __call__(self, position: int, example: dict) -> dict:
    if self.enabled and example_rng(self.seed, position).random() < 0.5:
      example = dict(example, image=example["image"][:, ::-1])
    return example


def scale_batch(batch: dict) -> dict:
  """grain batch map: uint8 images -> float32 [-1, 1]; labels int32; other counters unchanged."""
  return dict(batch, image=to_unit_range(batch["image"]), label=batch["label"].astype(np.int32))
