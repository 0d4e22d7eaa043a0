"""--mode=extract_latents: an image set's VAE posterior moments, written in `data.latents`' format.

Kept apart from the input pipeline: the writer reads images through the pipeline, the pipeline
reads latents through `data.latents`, and neither needs the other's module.
"""

import json
import os

import grain
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter

from dim_jax.data import pipeline
from dim_jax.data.decoded import pop_counters
from dim_jax.data.latents import METADATA, encode_record, shard_file_name


def extract_latents(
  encoder,
  data_cfg,
  out_dir: str,
  *,
  batch_size: int = 64,
  process_index: int = 0,
  process_count: int = 1,
  dtype: str = "float32",
) -> dict:
  """Encodes this process's share of `data_cfg`'s split into `out_dir`; returns counts.

  `encoder(images)`: images float32 (B, H, W, C) in [-1, 1] -> (mean, logvar), each
  (B, h, w, c). It is always called with `batch_size` images (the last batch is padded), so a
  jitted encoder compiles once. Every process writes its own file; process 0 writes the metadata.
  `dtype` ("float32" or "float16") is the storage type of the moments.
  """
  if dtype not in ("float32", "float16"):
    raise ValueError(f"latent dtype={dtype!r} is not float32 or float16.")
  if data_cfg.get("name") == "latents":
    raise ValueError("data.name='latents' are latents already; extract from an image data set.")
  source = pipeline.make_source(data_cfg)
  dataset = pipeline.shard(grain.MapDataset.source(source), process_index, process_count)
  stream = pipeline.batched_stream(dataset, data_cfg, batch_size, source, drop_remainder=False)

  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, shard_file_name(process_index, process_count))
  writer = ArrayRecordWriter(path, "group_size:1")  # one record per chunk: cheap random reads
  counts = {"examples": 0, "bad_files": 0, "converted": 0}
  latent_shape = None
  for batch in stream:
    for key, value in pop_counters(batch).items():
      counts[key] += value
    images, labels = batch["image"], batch["label"]  # (b, H, W, C), (b,)
    count = len(labels)
    padded = np.concatenate([images, np.repeat(images[-1:], batch_size - count, axis=0)])
    moments = []
    for view in (padded, padded[:, :, ::-1]):  # as it is, flipped
      mean, logvar = encoder(view)
      moments.append(np.stack([np.asarray(mean), np.asarray(logvar)], axis=1)[:count])
    moments = np.stack(moments, axis=1).astype(dtype)  # (b, 2 flips, 2 moments, h, w, c)
    latent_shape = moments.shape[3:]
    for label, example in zip(labels, moments, strict=True):
      writer.write(encode_record(int(label), example))
    counts["examples"] += count
    logging.log_every_n_seconds(logging.INFO, "extracted %d latents", 30, counts["examples"])
  writer.close()

  if process_index == 0:
    metadata = {
      "latent_shape": list(latent_shape),
      "dtype": dtype,
      "num_examples": len(source),
      "num_classes": source.info().num_classes,
      "files": [shard_file_name(p, process_count) for p in range(process_count)],
      "source": {key: data_cfg[key] for key in ("name", "image_size") if key in data_cfg},
    }
    with open(os.path.join(out_dir, METADATA), "w") as f:
      json.dump(metadata, f, indent=2)
  logging.info("wrote %s: %s", path, counts)
  return counts
