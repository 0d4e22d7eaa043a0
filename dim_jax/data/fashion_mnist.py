"""Fashion-MNIST from its local IDX files (Debian's `dataset-fashion-mnist` installs them).

Reads {train,t10k}-{images-idx3,labels-idx1}-ubyte, gzipped or not, from a folder; 28² grayscale
images are zero-padded (black, -1 after scaling) to `image_size`² with one channel.
"""

import gzip
import os

import numpy as np

from dim_jax.data import preprocess
from dim_jax.data.base import ImageSource

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (.gz) -> array. Layout: 0, 0, dtype code, rank, big-endian dims, data."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
  rank = raw[3]
  shape = tuple(np.frombuffer(raw, ">u4", count=rank, offset=4).tolist())
  data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * rank)
  if data.size != np.prod(shape):
    raise ValueError(f"{path} holds {data.size} values, but its header says {shape}.")
  return data.reshape(shape)


def _find(folder: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise ValueError(
    f"{stem}[.gz] is not in data.data_dir={folder!r}; `apt-get install dataset-fashion-mnist` "
    f"fills {DEFAULT_DIR}, or set data.data_dir to a folder with the Fashion-MNIST IDX files."
  )


class FashionMnistSource(ImageSource):
  """The `split` ("train": 60 000, "test": 10 000) of Fashion-MNIST, 10 classes, 1 channel."""

  num_classes = 10
  reads_files = False  # all in memory once loaded

  def __init__(self, folder: str, split: str, image_size: int, random_flip: bool = True):
    if split not in _PREFIX:
      raise ValueError(f"data.split={split!r} is not a Fashion-MNIST split; use one of {_PREFIX}.")
    if image_size < 28:
      raise ValueError(f"data.image_size={image_size} is below Fashion-MNIST's 28; use 28 or 32.")
    prefix = _PREFIX[split]
    self.images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))  # (N, 28, 28) uint8
    self.labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))  # (N,) uint8
    if self.images.ndim != 3 or len(self.images) != len(self.labels):
      raise ValueError(
        f"Fashion-MNIST files in {folder!r} disagree: images {self.images.shape}, "
        f"labels {self.labels.shape}."
      )
    # (N, image_size, image_size), padded once for all (60 MiB at 32²): padding each example as
    # it was read took a third of the input pipeline's time.
    self.padded = preprocess.pad_to_size(self.images.transpose(1, 2, 0), image_size)
    self.padded = np.ascontiguousarray(self.padded.transpose(2, 0, 1))
    self.image_size, self.random_flip = image_size, random_flip
    self.image_shape = (image_size, image_size, 1)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.padded[index][..., None], "label": int(self.labels[index])}
