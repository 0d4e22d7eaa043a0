"""What every source gives the pipeline: its shape and classes, random access, augmentation."""

import dataclasses

from dim_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  image_shape: tuple[int, int, int]  # (H, W, C) of batch["image"]: pixels, or latents
  num_classes: int  # labels are 0 .. num_classes - 1 (0 classes: unconditional, all labels 0)
  num_examples: int  # in the whole split, over all processes


class ImageSource:
  """Base of the pixel sources: examples are {"image": uint8 (H, W, C), "label": int}.

  Subclasses set `image_shape`, `num_classes`, `random_flip` and implement `__len__` and
  `__getitem__` (deterministic: decode, crop or pad). The random flip happens in `augment`, a grain
  random map keyed by stream position, and `finalize` scales whole batches to float32 [-1, 1].
  """

  image_shape: tuple[int, int, int]
  num_classes: int
  random_flip: bool = True
  # False for sources computed in memory: `data.read_threads` threads then only contend for the
  # GIL (the pipeline read 2-4x fewer images/s with 8 than with none), so none are used.
  reads_files: bool = True

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict:
    raise NotImplementedError

  def info(self) -> DatasetInfo:
    return DatasetInfo(tuple(self.image_shape), self.num_classes, len(self))

  def augment(self) -> preprocess.RandomFlip:
    return preprocess.RandomFlip(enabled=self.random_flip)

  def finalize(self, batch: dict) -> dict:
    return preprocess.scale_batch(batch)
