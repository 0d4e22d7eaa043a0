"""VAE latents: posterior moments extracted once (`dim_jax.tools.extract_latents`), then the
posterior sampled at every step.

Latent diffusion as in DiM / U-ViT: each image is encoded once, as it is and flipped, to the
moments (mean, log-variance) of the VAE posterior; training draws z = mean + exp(logvar / 2) * eps
from one of the two (a random flip) and scales it by 0.18215 (Stable Diffusion's KL-f8 factor).

On disk (`out_dir`):
  metadata.json                     latent_shape (h, w, c), dtype, num_examples, num_classes, files
  latents-PPPPP-of-NNNNN.array_record one per extracting process; record = little-endian int32
                                    label, then moments (2 flips, 2 = (mean, logvar), h, w, c)
"""

import json
import os

import grain
import numpy as np

from dim_jax.data.base import DatasetInfo

SD_LATENT_SCALE = 0.18215
METADATA = "metadata.json"
_LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of Stable Diffusion's DiagonalGaussianDistribution


def shard_file_name(process_index: int, process_count: int) -> str:
  return f"latents-{process_index:05d}-of-{process_count:05d}.array_record"


def encode_record(label: int, moments: np.ndarray) -> bytes:
  """(label, moments (2, 2, h, w, c)) -> one record's bytes."""
  little_endian = moments.astype(moments.dtype.newbyteorder("<"))
  return np.array(label, "<i4").tobytes() + little_endian.tobytes()


def decode_record(record: bytes, latent_shape, dtype: str) -> tuple[int, np.ndarray]:
  """One record's bytes -> (label, float32 moments (2, 2, h, w, c))."""
  label = int(np.frombuffer(record, "<i4", count=1)[0])
  moments = np.frombuffer(record, np.dtype(dtype).newbyteorder("<"), offset=4)
  return label, moments.reshape(2, 2, *latent_shape).astype(np.float32)


class SamplePosterior(grain.transforms.RandomMap):
  """grain random map: moments -> scaled posterior sample, one flip at random (`rng` is grain's,
  seeded from the pipeline seed and the stream position, as for preprocess.RandomFlip)."""

  def __init__(self, scale: float, random_flip: bool):
    self.scale, self.random_flip = scale, random_flip

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    side = int(rng.integers(2)) if self.random_flip else 0
    mean, logvar = example["moments"][side]  # (h, w, c) each
    std = np.exp(0.5 * np.clip(logvar, *_LOGVAR_RANGE))
    latent = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return {"image": (self.scale * latent).astype(np.float32), "label": example["label"]}


class LatentSource:
  """The latents in `folder` (written by `tools.extract_latents`); examples {"moments", "label"}."""

  def __init__(self, folder: str, scale: float = SD_LATENT_SCALE, random_flip: bool = True):
    metadata_path = os.path.join(folder, METADATA)
    if not os.path.isfile(metadata_path):
      raise ValueError(
        f"data.data_dir={folder!r} has no {METADATA}; write latents there first with "
        "--mode=extract_latents."
      )
    with open(metadata_path) as f:
      self.metadata = json.load(f)
    paths = [os.path.join(folder, name) for name in self.metadata["files"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise ValueError(f"latent files {missing} are missing; re-run --mode=extract_latents.")
    self.records = grain.sources.ArrayRecordDataSource(paths)
    if len(self.records) != self.metadata["num_examples"]:
      raise ValueError(
        f"{folder} holds {len(self.records)} latents but its metadata says "
        f"{self.metadata['num_examples']}; an extraction did not finish, re-run it."
      )
    self.latent_shape = tuple(self.metadata["latent_shape"])
    self.scale, self.random_flip = scale, random_flip

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    label, moments = decode_record(self.records[index], self.latent_shape, self.metadata["dtype"])
    return {"moments": moments, "label": label}

  def info(self) -> DatasetInfo:
    return DatasetInfo(self.latent_shape, self.metadata["num_classes"], len(self))

  def augment(self) -> SamplePosterior:
    return SamplePosterior(self.scale, self.random_flip)

  def finalize(self, batch: dict) -> dict:
    return dict(batch, label=batch["label"].astype(np.int32))
