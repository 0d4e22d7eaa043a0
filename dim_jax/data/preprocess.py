"""NumPy / PIL preprocessing of images, as in ADM (Dhariwal & Nichol 2021) and DiM's training.

Every function here is pure NumPy or PIL (never JAX), so grain may run them in worker processes.
"""

import grain
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


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip of example["image"] with probability 1/2.

  A grain random map over the endless global stream: grain seeds `rng` from the pipeline's seed
  and the stream position (not the example), so an example gets a fresh flip every epoch, a
  restarted iterator draws the same numbers, and every process count draws the same numbers for
  the same row of the same global batch.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if self.enabled and rng.random() < 0.5:
      example = dict(example, image=example["image"][:, ::-1])
    return example


def scale_batch(batch: dict) -> dict:
  """grain batch map: uint8 images -> float32 [-1, 1]; labels int32; other counters unchanged."""
  return dict(batch, image=to_unit_range(batch["image"]), label=batch["label"].astype(np.int32))
