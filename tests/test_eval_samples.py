"""evaluate_samples and the reference-statistics files, with a NumPy stand-in feature network.

The stand-in maps each image to fixed features, so every expected value is computed here from the
whole image set at once (np.mean, np.cov, scipy's sqrtm, brute-force neighbours).
"""

import numpy as np
import pytest
import scipy.linalg

from dim_jax import eval_metrics as em
from dim_jax.data import preprocess


class StandIn:
  """uint8 (B, 4, 4, 1) -> pool (B, 16), spatial (B, 5), logits (B, 3); records batch sizes."""

  def __init__(self, rng):
    self.projection = rng.normal(size=(16, 3))
    self.batch_sizes = []

  def __call__(self, images):
    self.batch_sizes.append(len(images))
    pool = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return {"pool": pool, "spatial": np.sin(3 * pool[:, :5]), "logits": pool @ self.projection}


def _batches(images, size=8):
  return (images[i : i + size] for i in range(0, len(images), size))


def _setup():
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  real = rng.integers(0, 256, (37, 4, 4, 1), dtype=np.uint8)
  fake = np.clip(rng.normal(90, 60, (29, 4, 4, 1)), 0, 255).astype(np.uint8)
  return rng, seed, real, fake


def _closed_form_fd(x, y):
  (m1, s1), (m2, s2) = (x.mean(0), np.cov(x, rowvar=False)), (y.mean(0), np.cov(y, rowvar=False))
  return np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)


def test_reference_stats_stream_and_keep_the_first_features():
  rng, seed, real, _ = _setup()
  fn = StandIn(rng)
  ref = em.compute_reference_stats(_batches(real), fn, manifold_size=20)
  whole = StandIn(rng)(real)
  np.testing.assert_allclose(ref.mu, whole["pool"].mean(0), rtol=1e-12, err_msg=str(seed))
  np.testing.assert_allclose(ref.sigma, np.cov(whole["pool"], rowvar=False), atol=1e-12)
  np.testing.assert_allclose(ref.sigma_s, np.cov(whole["spatial"], rowvar=False), atol=1e-12)
  np.testing.assert_array_equal(ref.features, whole["pool"][:20])
  assert fn.batch_sizes == [8] * 5, "a short last batch must be padded to the first's size"


def test_evaluate_samples_against_independent_references():
  rng, seed, real, fake = _setup()
  fn = StandIn(rng)
  ref = em.compute_reference_stats(_batches(real), fn, manifold_size=37)
  # Samples arrive as [-1, 1] floats and are rounded back to the same uint8 images.
  same = em.evaluate_samples(_batches(preprocess.to_unit_range(real)), fn, ref)
  assert abs(same["fid"]) < 1e-9 and abs(same["sfid"]) < 1e-9, f"seed {seed}: {same}"
  assert (same["precision"], same["recall"]) == (1.0, 1.0) and same["num_samples"] == 37

  got = em.evaluate_samples(_batches(fake), fn, ref, split_size=10)
  real_f, fake_f = fn(real), fn(fake)
  expected_fid = _closed_form_fd(fake_f["pool"], real_f["pool"])
  expected_sfid = _closed_form_fd(fake_f["spatial"], real_f["spatial"])
  assert abs(got["fid"] - expected_fid) < 1e-6 * expected_fid, f"seed {seed}"
  assert abs(got["sfid"] - expected_sfid) < 1e-6 * expected_sfid, f"seed {seed}"
  expected_pr = em.precision_recall(real_f["pool"], fake_f["pool"])  # tested on its own
  assert (got["precision"], got["recall"]) == expected_pr
  assert got["num_samples"] == 29 and got["inception_score"] >= 1.0


def test_reference_files_round_trip_and_adm_reference_batches(tmp_path):
  rng, seed, real, fake = _setup()
  fn = StandIn(rng)
  ref = em.compute_reference_stats(_batches(real), fn, manifold_size=10)
  em.save_reference_stats(str(tmp_path / "own.npz"), ref)
  loaded = em.load_reference_stats(str(tmp_path / "own.npz"))
  for name in ("mu", "sigma", "mu_s", "sigma_s", "features"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(ref, name), err_msg=name)

  # ADM's reference batch: precomputed mu/sigma (+ spatial) and the images arr_0.
  np.savez(tmp_path / "adm.npz", arr_0=real, mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s,
           sigma_s=ref.sigma_s)  # fmt: skip
  adm = em.load_reference_stats(str(tmp_path / "adm.npz"), feature_fn=fn, batch_size=16)
  np.testing.assert_array_equal(adm.features, fn(real)["pool"], err_msg=f"seed {seed}")

  # U-ViT's / pytorch-fid's files hold mu and sigma only: FID and IS, nothing else.
  np.savez(tmp_path / "uvit.npz", mu=ref.mu, sigma=ref.sigma)
  uvit = em.load_reference_stats(str(tmp_path / "uvit.npz"))
  result = em.evaluate_samples(_batches(fake), fn, uvit)
  assert set(result) == {"fid", "inception_score", "num_samples"}


def test_missing_or_malformed_reference_files_say_how_to_make_them(tmp_path):
  with pytest.raises(ValueError, match="--mode=ref_stats"):
    em.load_reference_stats(str(tmp_path / "absent.npz"))
  np.savez(tmp_path / "odd.npz", mean=np.zeros(3))
  with pytest.raises(ValueError, match="no mu and sigma"):
    em.load_reference_stats(str(tmp_path / "odd.npz"))
