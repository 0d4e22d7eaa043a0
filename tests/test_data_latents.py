"""Latent extraction to array_record and posterior sampling against the closed form."""

import numpy as np
import pytest

from dim_jax import data
from dim_jax.data import latents
from dim_jax.tools.extract_latents import extract_latents


def _fresh_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**31)


class FakeEncoder:
  """(B, 8, 8, 3) -> mean: 2x2 average pool (B, 4, 4, 3); logvar: a fixed map of the mean."""

  def __init__(self, batch_size):
    self.batch_size, self.calls = batch_size, 0

  def __call__(self, images):
    assert images.shape[0] == self.batch_size, "the encoder must always get full batches"
    self.calls += 1
    return reference_moments(images)


def reference_moments(images):
  b, h, w, c = images.shape
  mean = images.astype(np.float64).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  logvar = -2.0 + 0.5 * np.sin(3 * mean)
  return mean.astype(np.float32), logvar.astype(np.float32)


SHAPES = dict(name="shapes", image_size=8, num_examples=10, worker_count=0, random_flip=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_extracted_moments_are_the_encoders_of_each_image_and_its_mirror(tmp_path, dtype):
  encoder = FakeEncoder(batch_size=4)
  counts = extract_latents(encoder, SHAPES, str(tmp_path), batch_size=4, dtype=dtype)
  assert counts["examples"] == 10 and encoder.calls == 2 * 3  # 4 + 4 + 2 (padded)
  latent_cfg = dict(name="latents", data_dir=str(tmp_path))
  info = data.dataset_info(latent_cfg)
  assert (info.image_shape, info.num_classes, info.num_examples) == ((4, 4, 3), 4, 10)
  source, images = data.make_source(latent_cfg), data.make_source(SHAPES)
  tolerance = 0 if dtype == "float32" else 2e-3
  for i in range(10):
    image = images[i]["image"][None].astype(np.float32) / 127.5 - 1  # (1, 8, 8, 3)
    got = source[i]
    assert got["label"] == images[i]["label"]
    for side, view in enumerate((image, image[:, :, ::-1])):
      mean, logvar = reference_moments(view)
      np.testing.assert_allclose(got["moments"][side, 0], mean[0], atol=tolerance, rtol=tolerance)
      np.testing.assert_allclose(got["moments"][side, 1], logvar[0], atol=tolerance, rtol=tolerance)


def test_two_processes_write_shards_that_read_back_as_the_whole_set(tmp_path):
  for process in range(2):
    counts = extract_latents(
      FakeEncoder(3), SHAPES, str(tmp_path), batch_size=3, process_index=process, process_count=2
    )
    assert counts["examples"] == 5
  source = data.make_source(dict(name="latents", data_dir=str(tmp_path)))
  assert sorted(source[i]["label"] for i in range(10)) == sorted(i % 4 for i in range(10))
  (tmp_path / latents.shard_file_name(1, 2)).unlink()
  with pytest.raises(ValueError, match="missing; re-run --mode=extract_latents"):
    data.dataset_info(dict(name="latents", data_dir=str(tmp_path)))


def test_samples_follow_the_posterior_times_the_scale():
  """(z / scale - mean) / std over many stream positions is standard normal; flips are fair."""
  rng = np.random.default_rng(seed := _fresh_seed())
  moments = rng.normal(size=(2, 2, 3, 3, 4)).astype(np.float32)  # (flip, mean|logvar, h, w, c)
  moments[:, 1] = rng.uniform(-4, 1, size=(2, 3, 3, 4))
  moments[1, 0] += 100.0  # the flipped mean is far away: each sample shows which side it took
  example, scale, n = {"moments": moments, "label": 7}, 0.18215, 4000
  sample = latents.SamplePosterior(scale=scale, random_flip=True)
  draws = [sample.random_map(example, np.random.default_rng((seed, i))) for i in range(n)]
  assert all(d["label"] == 7 and d["image"].dtype == np.float32 for d in draws)
  z = np.stack([d["image"] for d in draws]).astype(np.float64) / scale  # (n, 3, 3, 4)
  side = (z.mean(axis=(1, 2, 3)) > 50).astype(int)
  # A fair coin over 4000 draws: within 5 sigma of 2000.
  assert abs(side.sum() - n / 2) < 5 * np.sqrt(n / 4), f"seed={seed}: {side.sum()} flips"
  mean, logvar = moments[side, 0].astype(np.float64), moments[side, 1].astype(np.float64)
  normal = (z - mean) / np.exp(0.5 * logvar)  # (n, 3, 3, 4), should be N(0, 1) i.i.d.
  m = normal.size
  assert abs(normal.mean()) < 5 / np.sqrt(m), f"seed={seed}: mean {normal.mean()}"
  assert abs(normal.var() - 1) < 5 * np.sqrt(2 / m), f"seed={seed}: var {normal.var()}"
  # The same generator state gives the same draw (grain keys it by stream position).
  again = sample.random_map(example, np.random.default_rng((seed, 11)))
  np.testing.assert_array_equal(again["image"], draws[11]["image"])


def test_latent_batches_from_the_training_iterator(tmp_path):
  seed = _fresh_seed()
  extract_latents(FakeEncoder(5), SHAPES, str(tmp_path), batch_size=5)
  cfg = dict(name="latents", data_dir=str(tmp_path), worker_count=0)
  iterator = data.create_train_iterator(cfg, batch_size=4, seed=seed)
  batch = next(iterator)
  assert batch["image"].shape == (4, 4, 4, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and set(batch) == {"image", "label"}


def test_missing_latents_say_how_to_make_them(tmp_path):
  with pytest.raises(ValueError, match="--mode=extract_latents"):
    data.dataset_info(dict(name="latents", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="latents already"):
    extract_latents(FakeEncoder(1), dict(name="latents", data_dir=str(tmp_path)), "x")
