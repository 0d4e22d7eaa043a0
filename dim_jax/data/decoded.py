"""Sources of encoded image files (JPEG, PNG, ...): decode with PIL, crop as ADM, survive bad files.

A long run must not end on one bad file. An image in another mode (grayscale, palette, CMYK,
16-bit, with alpha) is converted to RGB (alpha composited over white) and counted in "converted".
A file that cannot be read or decoded (zero bytes, truncated, corrupt) is logged, counted in
"bad_files" of the example at its index, and replaced by the next readable file of the split, so
batches keep their size and the shuffle stays a function of the seed alone.
"""

import io

import numpy as np
from absl import logging
from PIL import Image

from dim_jax.data import preprocess
from dim_jax.data.base import ImageSource

# Per-example counters these sources add to each batch (sum them over a batch for the metrics).
COUNTER_KEYS = ("bad_files", "converted")

# Consecutive unreadable files after which the data, not a file, is broken.
_MAX_CONSECUTIVE_BAD = 100


def decode_rgb(encoded: bytes) -> tuple[Image.Image, bool]:
  """Encoded image -> (decoded RGB PIL image, whether it had to be converted from another mode).

  Raises (OSError, PIL.UnidentifiedImageError, ...) on empty, truncated or corrupt data.
  """
  image = Image.open(io.BytesIO(encoded))
  image.load()  # decode now, so truncated data fails here and not later in the crop
  if image.mode == "RGB":
    return image, False
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB"), True
  return image.convert("RGB"), True


class DecodedImageSource(ImageSource):
  """Base of file-backed sources; subclasses implement `read` and `describe`.

  Examples: {"image": uint8 (S, S, 3) ADM centre crop, "label", "bad_files", "converted"}.
  """

  image_size: int

  def read(self, index: int) -> tuple[bytes, int]:
    """Example `index` -> (encoded image, label); may raise if the file cannot be read."""
    raise NotImplementedError

  def describe(self, index: int) -> str:
    """Where example `index` comes from, for the warning about a bad file."""
    raise NotImplementedError

  def _decode(self, index: int) -> tuple[np.ndarray, int, bool]:
    encoded, label = self.read(index)
    image, converted = decode_rgb(encoded)
    return preprocess.adm_center_crop(image, self.image_size), label, converted

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    for attempt in range(_MAX_CONSECUTIVE_BAD):
      candidate = (index + attempt) % len(self)
      try:
        image, label, converted = self._decode(candidate)
      except Exception as error:  # any undecodable file is skipped, never fatal
        logging.warning(
          "skipping %s: %s: %s", self.describe(candidate), type(error).__name__, error
        )
        continue
      return {
        "image": image,
        "label": label,
        "bad_files": np.int32(attempt > 0),
        "converted": np.int32(converted),
      }
    raise ValueError(
      f"{_MAX_CONSECUTIVE_BAD} consecutive images from #{index} cannot be decoded; check the data "
      "set files (see the warnings above)."
    )


def pop_counters(batch: dict) -> dict:
  """Removes the per-example counters from a batch; returns their sums ({} for other sources)."""
  return {key: int(batch.pop(key).sum()) for key in COUNTER_KEYS if key in batch}
