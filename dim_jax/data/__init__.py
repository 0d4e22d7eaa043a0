"""Input pipelines: grain over random-access sources, host-local NumPy batches. No TensorFlow.

  info = data.dataset_info(data_cfg)  # DatasetInfo(image_shape=(H, W, C), num_classes, ...)
  it = data.create_train_iterator(data_cfg, batch_size=global_batch, seed=0, rows=(start, stop),
                                 start_batch=step)  # a resumed run starts at its step's batch
  batch = next(it)   # its rows: {"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,)}
  counts = data.pop_counters(batch)  # {"bad_files": n, "converted": n} for file sources, else {}

`data_cfg` fields (ConfigDict or dict). A field a source does not use is ignored by it; a missing
optional field takes the default shown.

  name          shapes | fashion_mnist | cifar10 | imagenet2012 | image_folder | latents
  image_size    side of the square images (default 32; 256 for imagenet2012 and image_folder)
  worker_count  grain worker processes; 0 reads in the main process (default 0). The batches
                do not depend on it, so it may change across a resume.
  read_threads  threads per process that read and decode files ahead (default 8; sources in
                memory, shapes and fashion_mnist, read in the consuming thread)
  random_flip   random horizontal flip, p = 1/2 (default True)
  data_dir      where the data lie (see each source; None or "" = the source's default)
  split         "train" (default), or another split of the source

  shapes         procedural coloured shapes, 4 classes (circle, square, triangle, cross), RGB,
                 drawn from the example index; no files.
    num_examples   size of the set (default 50_000)
    shape_colours  "random" (default) or "by_class": one colour per class on a dark background
    rotate_shapes  random rotation (default True)
  fashion_mnist  Fashion-MNIST IDX files, 10 classes, 1 channel, 28² zero-padded to image_size.
    data_dir       folder of {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
                   (None: /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)
    split          "train" (60 000) or "test" (10 000)
  cifar10, imagenet2012  TFDS sets prepared as array_record, ADM centre crop, RGB.
    data_dir       TFDS data dir (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
    download       prepare the set if it is missing (default False; needs TensorFlow)
    manual_dir     imagenet2012 only, with download: folder of ILSVRC2012_img_{train,val}.tar
  image_folder   a folder of images, ADM centre crop, RGB. Class sub-folders -> labels (sorted
                 names); a flat folder -> unconditional (num_classes 0, labels 0).
    data_dir       the folder (required)
  latents        VAE posterior moments written by `tools.extract_latents`; batch["image"] is a
                 posterior sample times latent_scale, of shape (h, w, c) from the metadata.
    data_dir       the folder --mode=extract_latents wrote (required)
    latent_scale   (default 0.18215, Stable Diffusion's KL-f8 VAE)

Sources that decode files (cifar10, imagenet2012, image_folder) add per-example counters
"bad_files" (unreadable file replaced by the next one) and "converted" (grayscale / CMYK /
palette / alpha converted to RGB) to each batch; `pop_counters` removes them and sums them.
"""

from dim_jax.data.base import DatasetInfo
from dim_jax.data.decoded import COUNTER_KEYS, pop_counters
from dim_jax.data.pipeline import SOURCES, create_train_iterator, dataset_info, make_source

__all__ = [
  "COUNTER_KEYS",
  "SOURCES",
  "DatasetInfo",
  "create_train_iterator",
  "dataset_info",
  "make_source",
  "pop_counters",
]
