"""The grain pipeline shared by every source: shuffle per epoch, augment, take this process's
rows of each global batch, batch, prefetch.

  source.shuffle(seed).repeat()           the global stream: a new permutation every epoch
  .random_map(augment, seed)              random flip / posterior sample keyed by stream position
  rows (start, stop) of each global batch what this process's devices hold of it
  .to_iter_dataset(ReadOptions)           `read_threads` threads read ahead (file sources only)
  .batch(stop - start).map(finalize)      uint8 -> float32 [-1, 1] on whole batches
  .mp_prefetch(worker_count)              worker processes when worker_count > 0

Every process walks the same global stream and reads only its rows of each global batch, so the
global batches, and with them a training run, are the same on any number of processes and grain
workers (one GPU or a pod give the same losses). Everything before `to_iter_dataset` is
index-based, so the iterator can start at any global batch (`start_batch`): a run resumed at step
k starts at batch k and sees exactly the batches an uninterrupted one would, whatever its layout.
"""

import signal

import grain
from absl import flags

from dim_jax.data.base import DatasetInfo


def _make_shapes(data_cfg):
  from dim_jax.data import shapes

  return shapes.ShapesSource(
    num_examples=data_cfg.get("num_examples", 50_000),
    image_size=data_cfg.get("image_size", 32),
    random_flip=data_cfg.get("random_flip", True),
    colours=data_cfg.get("shape_colours", "random"),
    rotate=data_cfg.get("rotate_shapes", True),
  )


def _make_fashion_mnist(data_cfg):
  from dim_jax.data import fashion_mnist

  return fashion_mnist.FashionMnistSource(
    folder=data_cfg.get("data_dir", None) or fashion_mnist.DEFAULT_DIR,
    split=data_cfg.get("split", "train"),
    image_size=data_cfg.get("image_size", 32),
    random_flip=data_cfg.get("random_flip", True),
  )


def _make_tfds(name):
  def make(data_cfg):
    from dim_jax.data import tfds_source

    return tfds_source.TfdsSource(
      name,
      split=data_cfg.get("split", "train"),
      image_size=data_cfg.get("image_size", 32 if name == "cifar10" else 256),
      data_dir=data_cfg.get("data_dir", None) or None,  # "" also means TFDS's default
      download=data_cfg.get("download", False),
      manual_dir=data_cfg.get("manual_dir", None) or None,
      random_flip=data_cfg.get("random_flip", True),
    )

  return make


def _required_dir(data_cfg) -> str:
  folder = data_cfg.get("data_dir", None)
  if not folder:
    raise ValueError(f"data.name={data_cfg['name']!r} needs data.data_dir; set it to its folder.")
  return folder


def _make_image_folder(data_cfg):
  from dim_jax.data import image_folder

  return image_folder.ImageFolderSource(
    _required_dir(data_cfg),
    image_size=data_cfg.get("image_size", 256),
    random_flip=data_cfg.get("random_flip", True),
  )


def _make_latents(data_cfg):
  from dim_jax.data import latents

  return latents.LatentSource(
    _required_dir(data_cfg),
    scale=data_cfg.get("latent_scale", latents.SD_LATENT_SCALE),
    random_flip=data_cfg.get("random_flip", True),
  )


SOURCES = {
  "shapes": _make_shapes,
  "fashion_mnist": _make_fashion_mnist,
  "cifar10": _make_tfds("cifar10"),
  "imagenet2012": _make_tfds("imagenet2012"),
  "image_folder": _make_image_folder,
  "latents": _make_latents,
}


def make_source(data_cfg):
  """data_cfg.name -> the random-access source of the whole split (not yet sharded)."""
  name = data_cfg.get("name", None)
  if name not in SOURCES:
    raise ValueError(f"data.name={name!r} is not a data set; use one of {sorted(SOURCES)}.")
  return SOURCES[name](data_cfg)


def dataset_info(data_cfg) -> DatasetInfo:
  """Shape of batch["image"] (H, W, C), number of classes and examples of `data_cfg`'s split."""
  return make_source(data_cfg).info()


def shard(dataset: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """Process `process_index`'s strided share of `dataset`; shards are disjoint and cover it."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  if len(dataset) < process_count:
    raise ValueError(
      f"the data set has {len(dataset)} examples, fewer than the {process_count} processes."
    )
  return dataset[process_index::process_count]


class RowsOfGlobalBatches:
  """grain map: local position -> the example that makes local batch j hold rows (start, stop) of
  global batch first_batch + j. A class, not a closure, so grain's worker processes can pickle it.

  grain's worker w of `workers` reads positions w, w + workers, ... and batches them; the main
  process takes the workers' batches in turn. So positions go worker-major within each block of
  `workers` batches: worker w's b-th batch is then local batch b * workers + w, and the batches come
  out in order whatever the worker count (workers = 1 is the plain row-major layout).
  """

  def __init__(self, stream, batch_size: int, rows: tuple[int, int], first_batch=0, workers=1):
    self.stream, self.batch_size, self.rows = stream, batch_size, rows
    self.first_batch, self.workers = first_batch, workers

  def __call__(self, position: int) -> dict:
    start, stop = self.rows
    block, offset = divmod(position, self.workers * (stop - start))
    row, worker = divmod(offset, self.workers)
    batch = self.first_batch + block * self.workers + worker
    return self.stream[batch * self.batch_size + start + row]


def create_train_iterator(
  data_cfg,
  *,
  batch_size: int,
  seed: int,
  rows: tuple[int, int] | None = None,
  start_batch: int = 0,
) -> grain.DatasetIterator:
  """Endless iterator of this process's rows of each global batch of `batch_size` examples,
  from global batch `start_batch` on: {"image": float32 (stop - start, H, W, C), "label": (stop -
  start,)}.

  `rows` = (start, stop): the rows of the global batch this process reads (default: all of them;
  train.py takes those its devices hold, `parallel.local_rows`). A resumed run passes its step as
  `start_batch`; the batches depend on neither the rows nor data.worker_count, so nothing else of
  the iterator needs saving (get_state / set_state still work within one layout).
  """
  start, stop = (int(r) for r in rows or (0, batch_size))
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f"rows {(start, stop)} are not a non-empty part of a batch of {batch_size}.")
  if start_batch < 0:
    raise ValueError(f"start_batch={start_batch} must be >= 0 (a global batch index).")
  source = make_source(data_cfg)
  stream = grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat()
  stream = stream.random_map(source.augment(), seed=seed % 2**32)
  workers = max(data_cfg.get("worker_count", 0), 1)
  local = grain.MapDataset.range((len(stream) // batch_size - start_batch) * (stop - start))
  local = local.map(RowsOfGlobalBatches(stream, batch_size, (start, stop), start_batch, workers))
  return iter(batched_stream(local, data_cfg, stop - start, source, drop_remainder=True))


def batched_stream(
  dataset: grain.MapDataset, data_cfg, batch_size: int, source, *, drop_remainder: bool
) -> grain.IterDataset:
  """Threaded read-ahead (sources that read files), batching, `source.finalize` on each batch,
  and worker processes if asked."""
  if batch_size < 1:
    raise ValueError(f"per-process batch size {batch_size} must be at least 1.")
  threads = data_cfg.get("read_threads", 8) if getattr(source, "reads_files", True) else 0
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch_size)
  stream = dataset.to_iter_dataset(read_options)
  stream = stream.batch(batch_size, drop_remainder=drop_remainder).map(source.finalize)
  worker_count = data_cfg.get("worker_count", 0)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; scripts outside absl.app
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_ignore_ctrl_c
    )
  return stream


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """Ctrl-C reaches the whole process group; the main process saves and stops the workers, which
  must not die (or swallow it) first."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
