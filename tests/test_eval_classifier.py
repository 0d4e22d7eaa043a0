"""The evaluation classifier learns, caches itself, and pads 28² inputs as the data pipeline does.

Synthetic stand-in for Fashion-MNIST (written as IDX files): class k is a bright square at the k-th
of ten places on a noisy black 28² canvas, so a few training steps must separate the classes.
"""

import gzip
import shutil

import numpy as np
import pytest

from dim_jax import eval_classifier as fc
from dim_jax import eval_metrics as em
from dim_jax.data import fashion_mnist

TINY = dict(width=8, features=32, epochs=6, batch_size=50, learning_rate=3e-3, seed=0)


def _synthetic(rng, count):
  labels = rng.integers(0, 10, count).astype(np.uint8)
  images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8)
  for image, label in zip(images, labels, strict=True):
    row, col = divmod(int(label), 5)
    image[2 + 12 * row : 12 + 12 * row, 1 + 5 * col : 6 + 5 * col] = 230
  return images, labels


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def test_trains_caches_and_scores(tmp_path):
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  data_dir = tmp_path / "fmnist"
  data_dir.mkdir()
  images, labels = _synthetic(rng, 500)
  _write_idx(data_dir / "train-images-idx3-ubyte.gz", images)
  _write_idx(data_dir / "train-labels-idx1-ubyte.gz", labels)

  def training_set():
    source = fashion_mnist.FashionMnistSource(str(data_dir), "train", 32)
    return source.images[..., None], source.labels

  cache = str(tmp_path / "cache")
  shape = dict(image_size=32, in_channels=1, num_classes=10, recipe=TINY)
  model = fc.load_or_train(cache, "fmnist", training_set, **shape)
  features = fc.make_feature_fn(model, 32)
  test_images, test_labels = _synthetic(rng, 200)
  acc = fc.accuracy(features, test_images[..., None], test_labels)
  assert acc > 0.9, f"seed {seed}: accuracy {acc} on separable classes"

  shutil.rmtree(data_dir)  # a second call must come from the cache, without the data
  cached = fc.make_feature_fn(fc.load_or_train(cache, "fmnist", training_set, **shape), 32)
  a = features(test_images[:16, ..., None])
  b = cached(test_images[:16, ..., None])
  np.testing.assert_array_equal(a["pool"], b["pool"])
  assert a["pool"].shape == (16, TINY["features"]) and a["logits"].shape == (16, 10)

  # 28² inputs are padded with black to 32², as the fashion_mnist recipe's pipeline pads them.
  padded = np.pad(test_images[:16, ..., None], ((0, 0), (2, 2), (2, 2), (0, 0)))
  np.testing.assert_array_equal(cached(padded)["pool"], a["pool"])

  # FD between two halves of one distribution is small next to the distance between classes.
  halves = [test_images[:100, ..., None], test_images[100:, ..., None]]
  ref = em.compute_reference_stats([halves[0]], cached, manifold_size=0)
  floor = em.evaluate_samples([halves[1]], cached, ref)["fid"]
  one_class = test_images[test_labels == test_labels[0]][..., None]
  collapsed = em.evaluate_samples([one_class], cached, ref)["fid"]
  assert 0 < 5 * floor < collapsed, f"seed {seed}: floor {floor}, one class {collapsed}"


def test_refuses_float_or_wrong_channels():
  with pytest.raises(ValueError, match="uint8"):
    fc.prepare_images(np.zeros((2, 28, 28, 1), np.float32), 32, 1)
  with pytest.raises(ValueError, match="uint8"):
    fc.prepare_images(np.zeros((2, 28, 28, 3), np.uint8), 32, 1)
