"""File sources on tiny generated data: image folders, Fashion-MNIST IDX, TFDS array_record."""

import gzip
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dim_jax import data
from dim_jax.data import fashion_mnist, preprocess, tfds_source


def _fresh_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**31)


def _save(path, array, mode=None, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path, **kwargs)


def _rgb(rng, size=(10, 14)):
  return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _expected_crop(array, size):
  return preprocess.adm_center_crop(Image.fromarray(array).convert("RGB"), size)


@pytest.fixture
def messy_folder(tmp_path):
  """Class folders "a" (good and odd modes) and "b" (3 bad files, then a good one)."""
  rng = np.random.default_rng(seed := _fresh_seed())
  root = tmp_path / "images"
  good1, good2, good3 = _rgb(rng), _rgb(rng), _rgb(rng, (12, 9))
  gray = rng.integers(0, 256, size=(9, 9), dtype=np.uint8)
  rgba = np.concatenate([_rgb(rng, (8, 8)), np.full((8, 8, 1), 255, np.uint8)], -1)
  rgba[0, :, 3] = 0  # a transparent top row: composited over white
  _save(root / "a" / "good1.png", good1)
  _save(root / "a" / "good2.bmp", good2)
  _save(root / "a" / "gray.png", gray)
  _save(root / "a" / "palette.png", _rgb(rng), "RGB")
  Image.open(root / "a" / "palette.png").convert("P").save(root / "a" / "palette.png")
  _save(root / "a" / "rgba.png", rgba)
  Image.fromarray(_rgb(rng)).convert("CMYK").save(root / "a" / "cmyk.jpg")
  (root / "a" / "notes.txt").write_text("not an image")
  _save(root / "b" / "good3.png", good3)
  os.makedirs(root / "b", exist_ok=True)
  (root / "b" / "bad_empty.png").write_bytes(b"")
  (root / "b" / "bad_garbage.png").write_bytes(rng.bytes(300))
  buffer = io.BytesIO()
  Image.fromarray(_rgb(rng, (64, 64))).save(buffer, "JPEG")
  (root / "b" / "bad_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  return dict(root=str(root), seed=seed, good1=good1, good3=good3, gray=gray, rgba=rgba)


def test_image_folder_converts_odd_modes_and_replaces_bad_files(messy_folder):
  folder, seed = messy_folder, messy_folder["seed"]
  cfg = dict(name="image_folder", data_dir=folder["root"], image_size=6, worker_count=0)
  source = data.make_source(cfg)
  names = [os.path.relpath(p, folder["root"]) for p in source.paths]
  assert names == [
    "a/cmyk.jpg",
    "a/good1.png",
    "a/good2.bmp",
    "a/gray.png",
    "a/palette.png",
    "a/rgba.png",
    "b/bad_empty.png",
    "b/bad_garbage.png",
    "b/bad_truncated.jpg",
    "b/good3.png",
  ]
  assert source.class_names == ["a", "b"] and source.labels == [0] * 6 + [1] * 4
  examples = [source[i] for i in range(len(source))]
  assert [int(e["bad_files"]) for e in examples] == [0] * 6 + [1, 1, 1, 0]
  assert [int(e["converted"]) for e in examples] == [1, 0, 0, 1, 1, 1, 0, 0, 0, 0]
  good3 = _expected_crop(folder["good3"], 6)
  for e in examples[6:]:  # the bad files were replaced by the next good one, label and all
    np.testing.assert_array_equal(e["image"], good3, err_msg=f"seed={seed}")
    assert e["label"] == 1
  np.testing.assert_array_equal(examples[1]["image"], _expected_crop(folder["good1"], 6))
  gray = examples[3]["image"]
  np.testing.assert_array_equal(gray, np.repeat(_expected_crop(folder["gray"], 6)[..., :1], 3, -1))

  # One epoch through the pipeline counts each bad file once and each conversion once.
  batch = next(data.create_train_iterator(cfg, batch_size=len(source), seed=seed))
  assert data.pop_counters(batch) == {"bad_files": 3, "converted": 4}
  assert set(batch) == {"image", "label"} and batch["image"].shape == (10, 6, 6, 3)


def test_alpha_is_composited_over_white():
  rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
  image, converted = data.decoded.decode_rgb(buffer.getvalue())
  assert converted and image.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(image), [[[255, 255, 255], [10, 20, 30]]])


def test_flat_folder_is_unconditional(tmp_path):
  rng = np.random.default_rng(seed := _fresh_seed())
  for i in range(3):
    _save(tmp_path / f"{i}.png", _rgb(rng))
  cfg = dict(name="image_folder", data_dir=str(tmp_path), image_size=8)
  info = data.dataset_info(cfg)
  assert (info.num_classes, info.num_examples, info.image_shape) == (0, 3, (8, 8, 3)), seed
  batch = next(data.create_train_iterator(cfg, batch_size=3, seed=seed))
  assert batch["label"].tolist() == [0, 0, 0]


def test_empty_or_missing_folders_fail_before_training(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    data.dataset_info(dict(name="image_folder", data_dir=str(tmp_path / "nowhere")))
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="has no images"):
    data.dataset_info(dict(name="image_folder", data_dir=str(tmp_path)))
  os.makedirs(tmp_path / "cats")
  with pytest.raises(ValueError, match="class folder .*cats.* has no images"):
    data.dataset_info(dict(name="image_folder", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="needs data.data_dir"):
    data.dataset_info(dict(name="image_folder", data_dir=None))


def _write_idx(path, array, compress):
  header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_files_are_read_and_padded(tmp_path, compress):
  rng = np.random.default_rng(seed := _fresh_seed())
  images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=5, dtype=np.uint8)
  suffix = ".gz" if compress else ""
  _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
  _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
  cfg = dict(name="fashion_mnist", data_dir=str(tmp_path), split="test", image_size=32)
  info = data.dataset_info(cfg)
  assert (info.image_shape, info.num_classes, info.num_examples) == ((32, 32, 1), 10, 5)
  source = data.make_source(cfg)
  for i in range(5):
    want = np.zeros((32, 32, 1), np.uint8)
    want[2:30, 2:30, 0] = images[i]  # 28 -> 32: two black pixels on every side
    np.testing.assert_array_equal(source[i]["image"], want, err_msg=f"seed={seed}")
    assert source[i]["label"] == labels[i]
  batch = next(data.create_train_iterator(dict(cfg, random_flip=False), batch_size=5, seed=seed))
  assert sorted(batch["label"].tolist()) == sorted(labels.tolist())
  assert batch["image"].shape == (5, 32, 32, 1)
  for image, label in zip(batch["image"], batch["label"], strict=True):
    candidates = [i for i in range(5) if labels[i] == label]
    assert any(np.allclose(image, source[i]["image"] / 127.5 - 1, atol=1e-6) for i in candidates)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
  with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
    data.dataset_info(dict(name="fashion_mnist", data_dir=str(tmp_path)))
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03")
  with pytest.raises(ValueError, match="not an IDX file"):
    fashion_mnist.read_idx(str(tmp_path / "train-images-idx3-ubyte"))


def test_tfds_array_record_set_is_read_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(seed := _fresh_seed())
  arrays = [_rgb(rng, (int(rng.integers(6, 20)), int(rng.integers(6, 20)))) for _ in range(6)]

  class TinyPngs(tfds.core.GeneratorBasedBuilder):
    # Not "tests.test_data_files": TFDS would look up package resources of the builder's module,
    # which needs the importlib_resources package.
    __module__ = "tiny_pngs_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3),
      }
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, array in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")  # PNG bytes: preparing needs no TensorFlow
        yield i, {"image": buffer.getvalue(), "label": i % 3}

  TinyPngs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = tfds_source.TfdsSource("tiny_pngs", "train", image_size=5, data_dir=str(tmp_path))
  assert len(source) == 6 and source.num_classes == 3
  read = sorted((int(source[i]["label"]), source[i]["image"].tobytes()) for i in range(6))
  want = sorted((i % 3, _expected_crop(a, 5).tobytes()) for i, a in enumerate(arrays))
  assert read == want, f"seed={seed}"

  # A fresh process reads the prepared set by name, and never imports TensorFlow.
  script = (
    "import sys; from dim_jax.data import tfds_source; "
    f"s = tfds_source.TfdsSource('tiny_pngs', 'train', image_size=5, data_dir={str(tmp_path)!r}); "
    "[s[i] for i in range(len(s))]; assert 'tensorflow' not in sys.modules, 'TF imported'"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]

  with pytest.raises(ValueError, match="tfds build cifar10 .*--file_format=array_record"):
    data.dataset_info(dict(name="cifar10", data_dir=str(tmp_path / "empty")))
