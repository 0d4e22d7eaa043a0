"""Input pipelines: grain over random-access sources, host-local NumPy batches.

  info = data.dataset_info(data_cfg)  # DatasetInfo(image_shape=(H, W, C), num_classes, ...)
  it = data.create_train_iterator(data_cfg, batch_size=per_process, seed=0,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  batch = next(it)   # {"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,)}

`data_cfg` fields (ConfigDict or dict; a field a source does not use is ignored by it, a missing
optional field takes the default shown):

  name          shapes
  image_size    side of the square images (default 32)
  worker_count  grain worker processes; 0 reads in the main process (default 0)
  read_threads  threads per process that read and decode ahead (default 8)
  random_flip   random horizontal flip (default True)

  shapes: procedural coloured shapes, 4 classes (circle, square, triangle, cross), RGB; no files.
    num_examples  size of the set (default 50_000)
"""

from dim_jax.data.base import DatasetInfo
from dim_jax.data.pipeline import SOURCES, create_train_iterator, dataset_info, make_source

__all__ = ["SOURCES", "DatasetInfo", "create_train_iterator", "dataset_info", "make_source"]
