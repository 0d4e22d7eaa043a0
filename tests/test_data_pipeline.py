"""The grain pipeline: seeded, resumable at any global batch, sharded, per-epoch shuffled,
flipped; the same batches on any number of processes and workers."""

import numpy as np
import pytest

from dim_jax import data
from dim_jax.data.base import ImageSource


def _fresh_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**31)


class IndexSource(ImageSource):
  """Example i: label i, and a 2x3 image whose pixels spell i and whose columns differ (flip)."""

  num_classes = 0

  def __init__(self, num_examples: int, random_flip: bool = True):
    self.num_examples, self.random_flip = num_examples, random_flip
    self.image_shape = (2, 3, 1)

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    image = np.array([[index % 251, 0, 1], [2, 3, index // 251]], np.uint8)[..., None]
    return {"image": image, "label": index}


@pytest.fixture
def index_data(monkeypatch):
  monkeypatch.setitem(
    data.SOURCES,
    "indices",
    lambda cfg: IndexSource(cfg["num_examples"], cfg.get("random_flip", True)),
  )
  return lambda n, **kw: dict(name="indices", num_examples=n, worker_count=0, **kw)


def _labels(iterator, num_batches):
  return np.concatenate([next(iterator)["label"] for _ in range(num_batches)])


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def _row_blocks(size, num_processes):
  """Uneven blocks of rows when num_processes does not divide size, like parallel.local_rows."""
  bounds = np.linspace(0, size, num_processes + 1).astype(int)
  return list(zip(bounds[:-1], bounds[1:], strict=True))


def _stacked(per_process):
  """Each process's list of batches -> the global batches, its rows stacked in process order."""
  return [
    {key: np.concatenate([batch[key] for batch in group]) for key in group[0]}
    for group in zip(*per_process, strict=True)
  ]


def _assert_same_batches(got, want, msg):
  assert len(got) == len(want)
  for step, (g, w) in enumerate(zip(got, want, strict=True)):
    assert g.keys() == w.keys(), msg
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=f"{msg}, batch {step}, {key!r}")


def test_shapes_batches_have_the_promised_layout():
  cfg = dict(name="shapes", image_size=16, num_examples=64, worker_count=0)
  info = data.dataset_info(cfg)
  assert info.image_shape == (16, 16, 3) and info.num_classes == 4 and info.num_examples == 64
  batch = next(data.create_train_iterator(cfg, batch_size=5, seed=0))
  assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_same_seed_same_batches_other_seed_other_batches():
  seed = _fresh_seed()
  cfg = dict(name="shapes", image_size=8, num_examples=40, worker_count=0)
  first = _take(data.create_train_iterator(cfg, batch_size=6, seed=seed), 9)  # crosses epochs
  again = _take(data.create_train_iterator(cfg, batch_size=6, seed=seed), 9)
  _assert_same_batches(again, first, f"seed={seed}")
  other = _take(data.create_train_iterator(cfg, batch_size=6, seed=seed + 1), 9)
  assert any(not np.array_equal(o["image"], f["image"]) for o, f in zip(other, first, strict=True))


def test_restored_state_continues_exactly_where_it_stopped():
  seed, rng = _fresh_seed(), np.random.default_rng(_fresh_seed())
  cfg = dict(name="shapes", image_size=8, num_examples=int(rng.integers(10, 30)), worker_count=0)
  stop = int(rng.integers(1, 12))
  uninterrupted = data.create_train_iterator(cfg, batch_size=4, seed=seed)
  _take(uninterrupted, stop)
  state = uninterrupted.get_state()
  want = _take(uninterrupted, 8)

  restored = data.create_train_iterator(cfg, batch_size=4, seed=seed)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 8), want, f"seed={seed} stop={stop} cfg={cfg}")


def test_every_epoch_is_a_new_permutation_of_the_split(index_data):
  seed, n = _fresh_seed(), 24
  labels = _labels(data.create_train_iterator(index_data(n), batch_size=4, seed=seed), 3 * n // 4)
  epochs = labels.reshape(3, n)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n), err_msg=f"seed={seed}")
  assert not np.array_equal(epochs[0], epochs[1]), f"seed={seed}: epoch 2 repeats epoch 1"


@pytest.mark.parametrize("num_processes", [2, 3])
def test_process_rows_rebuild_the_single_process_batches(index_data, num_processes):
  """Each process reads its block of rows of every global batch: stacked, the blocks equal the
  one-process batches (same examples, same flips), across epoch boundaries, so a run's global
  batches do not depend on the number of processes."""
  seed, size, steps = _fresh_seed(), 6, 7  # 7 batches of 6 from 20 examples: crosses 2 epochs
  single = _take(data.create_train_iterator(index_data(20), batch_size=size, seed=seed), steps)
  per_process = [
    _take(data.create_train_iterator(index_data(20), batch_size=size, seed=seed, rows=r), steps)
    for r in _row_blocks(size, num_processes)  # uneven blocks for 4 of 6 rows
  ]
  _assert_same_batches(_stacked(per_process), single, f"seed={seed}, {num_processes} processes")


@pytest.mark.parametrize("resume_processes", [1, 3])
def test_resume_at_global_batch_k_on_other_processes_continues_the_one_process_stream(
  index_data, resume_processes
):
  """A run saved at step k by 2 processes resumes on 1 or 3 at global batch k (the step is all a
  checkpoint keeps of the input): the stacked rows equal the uninterrupted one-process batches
  k, k+1, ..., across epoch boundaries."""
  seed, size, more = _fresh_seed(), 6, 5
  k = int(np.random.default_rng(seed).integers(1, 9))  # 20 examples: an epoch is 3 1/3 batches

  def batches(rows, start, count):
    it = data.create_train_iterator(
      index_data(20), batch_size=size, seed=seed, rows=rows, start_batch=start
    )
    return _take(it, count)

  single = batches(None, 0, k + more)
  before = _stacked([batches(r, 0, k) for r in _row_blocks(size, 2)])
  _assert_same_batches(before, single[:k], f"seed={seed}, 2 processes before the save")
  after = _stacked([batches(r, k, more) for r in _row_blocks(size, resume_processes)])
  msg = f"seed={seed}, resumed at batch {k} on {resume_processes} processes"
  _assert_same_batches(after, single[k:], msg)


def test_random_flip_mirrors_about_half_the_images_and_nothing_else(index_data):
  seed = _fresh_seed()
  batches = _take(data.create_train_iterator(index_data(50), batch_size=50, seed=seed), 4)
  flipped = 0
  for batch in batches:
    for image, label in zip(batch["image"], batch["label"], strict=True):
      original = IndexSource(50)[int(label)]["image"].astype(np.float64) / 127.5 - 1
      if np.allclose(image, original[:, ::-1], atol=1e-6):
        flipped += 1
      else:
        np.testing.assert_allclose(image, original, atol=1e-6, err_msg=f"seed={seed}")
  # 200 fair coin flips: 60..140 holds with probability 1 - 1e-8.
  assert 60 <= flipped <= 140, f"seed={seed}: {flipped} of 200 flipped"

  no_flip = _take(
    data.create_train_iterator(index_data(50, random_flip=False), batch_size=50, seed=seed), 1
  )[0]
  for image, label in zip(no_flip["image"], no_flip["label"], strict=True):
    want = IndexSource(50)[int(label)]["image"] / 127.5 - 1
    np.testing.assert_allclose(image, want, atol=1e-6, err_msg=f"seed={seed}")


def test_bad_names_and_arguments_fail_with_one_clear_line():
  with pytest.raises(ValueError, match="data.name='mnist'.*shapes"):
    data.dataset_info(dict(name="mnist"))
  cfg = dict(name="shapes", num_examples=3)
  for rows in [(2, 2), (0, 5), (-1, 2)]:
    with pytest.raises(ValueError, match=rf"rows \({rows[0]}, {rows[1]}\) .* batch of 4"):
      data.create_train_iterator(cfg, batch_size=4, seed=0, rows=rows)
  with pytest.raises(ValueError, match="start_batch=-1"):
    data.create_train_iterator(cfg, batch_size=4, seed=0, start_batch=-1)


def test_worker_processes_change_no_batch_even_when_resumed_on_other_rows():
  """grain workers read strided positions and take turns; the batches are still the no-worker
  ones, started from scratch or from an odd global batch on a block of rows, so data.worker_count
  may change across a resume too."""
  seed = _fresh_seed()
  cfg = dict(name="shapes", image_size=8, num_examples=21, worker_count=0)
  want = _take(data.create_train_iterator(cfg, batch_size=4, seed=seed), 8)
  three = _take(data.create_train_iterator(dict(cfg, worker_count=3), batch_size=4, seed=seed), 8)
  _assert_same_batches(three, want, f"seed={seed}, 3 workers")
  resumed = data.create_train_iterator(
    dict(cfg, worker_count=2), batch_size=4, seed=seed, rows=(1, 3), start_batch=3
  )
  rows_of_want = [{key: w[key][1:3] for key in w} for w in want[3:]]
  _assert_same_batches(_take(resumed, 5), rows_of_want, f"seed={seed}, 2 workers from batch 3")
  labels = np.concatenate([b["label"] for b in want])
  assert np.bincount(labels, minlength=4).min() > 0, f"seed={seed}: a class never appears"


@pytest.mark.parametrize("name", ["shapes", "fashion_mnist"])
def test_sources_in_memory_give_the_batches_of_the_threaded_read(tmp_path, monkeypatch, name):
  """Fashion-MNIST (padded once at load) and shapes read in the consuming thread: the same batches
  as the threaded read-ahead, one example at a time, gave."""
  from dim_jax.data import fashion_mnist, shapes

  seed = _fresh_seed()
  rng = np.random.default_rng(seed)
  cfg = dict(name=name, image_size=32, num_examples=40, worker_count=0, read_threads=8)
  if name == "fashion_mnist":
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    for stem, array in (("images-idx3", images), ("labels-idx1", images[:, 0, 0] % 10)):
      header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
      (tmp_path / f"train-{stem}-ubyte").write_bytes(header + array.tobytes())
    cfg["data_dir"] = str(tmp_path)
  in_memory = _take(data.create_train_iterator(cfg, batch_size=8, seed=seed), 7)
  source = fashion_mnist.FashionMnistSource if name == "fashion_mnist" else shapes.ShapesSource
  monkeypatch.setattr(source, "reads_files", True)  # the threaded read
  if name == "fashion_mnist":  # and each example padded as it is read
    monkeypatch.setattr(
      source, "__getitem__", lambda self, i: {
        "image": np.pad(self.images[i], 2)[..., None], "label": int(self.labels[i])
      }
    )  # fmt: skip
  threaded = _take(data.create_train_iterator(cfg, batch_size=8, seed=seed), 7)
  for got, want in zip(in_memory, threaded, strict=True):
    np.testing.assert_array_equal(got["image"], want["image"], err_msg=f"seed {seed}")
    np.testing.assert_array_equal(got["label"], want["label"], err_msg=f"seed {seed}")
