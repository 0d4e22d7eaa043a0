"""TFDS data sets read through ArrayRecord random access (`as_data_source`): no TensorFlow.

The image feature is read undecoded and decoded here with PIL (see decoded.py), so the ADM crop
sees the original pixels. Preparing a set (once) needs TensorFlow, which requirements.txt carries:

  tfds build cifar10 --data_dir=DIR --file_format=array_record
  tfds build imagenet2012 --data_dir=DIR --manual_dir=M --file_format=array_record
      (M holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org)

or set data.download=True to prepare it on first use.
"""

import tensorflow_datasets as tfds

from dim_jax.data.decoded import DecodedImageSource


def _prepare_command(name: str, data_dir: str | None) -> str:
  manual = " --manual_dir=DIR_WITH_ILSVRC2012_TARS" if name == "imagenet2012" else ""
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {name}{where}{manual} --file_format=array_record"


class TfdsSource(DecodedImageSource):
  """Split `split` of TFDS set `name` in `data_dir` (None: TFDS's default, ~/tensorflow_datasets).

  `download=True` prepares a missing set first (needs TensorFlow; ImageNet needs `manual_dir`).
  """

  def __init__(
    self,
    name: str,
    split: str,
    image_size: int,
    data_dir: str | None = None,
    download: bool = False,
    manual_dir: str | None = None,
    random_flip: bool = True,
  ):
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      if not download:
        raise ValueError(
          f"TFDS set {name!r} is not prepared in {builder.data_dir}; prepare it once with "
          f"`{_prepare_command(name, data_dir)}`, or set data.download=True."
        )
      config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      builder.download_and_prepare(download_config=config)
    try:
      self.records = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except (NotImplementedError, ValueError) as error:
      raise ValueError(
        f"cannot random-access TFDS set {name!r} split {split!r} in {builder.data_dir} ({error}); "
        f"it must be prepared as array_record: `{_prepare_command(name, data_dir)}`."
      ) from error
    self.name, self.split = name, split
    self.num_classes = builder.info.features["label"].num_classes
    self.image_size, self.random_flip = image_size, random_flip
    self.image_shape = (image_size, image_size, 3)

  def __len__(self) -> int:
    return len(self.records)

  def read(self, index: int) -> tuple[bytes, int]:
    record = self.records[index]
    return record["image"], int(record["label"])

  def describe(self, index: int) -> str:
    return f"{self.name}/{self.split} example {index}"
