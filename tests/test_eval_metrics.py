"""Fréchet distance, streaming moments, Inception Score and precision / recall against references.

References are closed forms, scipy.linalg.sqrtm, np.cov and float64 NumPy loops written here.
"""

import numpy as np
import pytest
import scipy.linalg

from dim_jax import eval_metrics as em


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _random_spd(rng, dim: int) -> np.ndarray:
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_sqrtm_matches_scipy_on_random_spd():
  rng, seed = _rng()
  for dim in (2, 17, 64):
    sigma = _random_spd(rng, dim)
    ours, theirs = em.sqrtm_psd(sigma), scipy.linalg.sqrtm(sigma).real
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert rel < 1e-6, f"seed {seed}, dim {dim}: relative error {rel}"


def test_trace_sqrt_product_matches_scipy():
  rng, seed = _rng()
  s1, s2 = _random_spd(rng, 32), _random_spd(rng, 32)
  expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
  got = em.trace_sqrt_product(s1, s2)
  assert abs(got - expected) / expected < 1e-6, f"seed {seed}: {got} vs {expected}"


def test_frechet_distance_closed_form_for_commuting_gaussians():
  # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ: d² = |μ1 - μ2|² + Σ (√a - √b)².
  rng, seed = _rng()
  dim = 24
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = em.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  assert abs(got - expected) / expected < 1e-9, f"seed {seed}: {got} vs {expected}"


def test_frechet_distance_of_gaussian_features_streamed_in_batches():
  rng, seed = _rng()
  dim, n = 8, 3000
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim) + 1.0
  x = rng.multivariate_normal(mu1, _random_spd(rng, dim), size=n) + 100.0  # offset: cancellation
  y = rng.multivariate_normal(mu2, _random_spd(rng, dim), size=n) + 100.0
  moments = []
  for data in (x, y):
    acc = em.StreamingMoments(dim)
    cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
    for part in np.split(data, cuts):  # uneven batches
      acc.update(part)
    np.testing.assert_allclose(acc.mean, data.mean(0), rtol=1e-12, err_msg=f"seed {seed}")
    cov = np.cov(data, rowvar=False)
    np.testing.assert_allclose(acc.covariance(), cov, rtol=1e-9, atol=1e-12, err_msg=f"seed {seed}")
    moments.append((acc.mean, acc.covariance()))
  # Closed form on the empirical Gaussians, with scipy's matrix square root.
  (m1, s1), (m2, s2) = (x.mean(0), np.cov(x, rowvar=False)), (y.mean(0), np.cov(y, rowvar=False))
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  got = em.frechet_distance(*moments[0], *moments[1])
  assert abs(got - expected) / expected < 1e-6, f"seed {seed}: {got} vs {expected}"


def test_frechet_distance_zero_for_identical_and_symmetric():
  rng, seed = _rng()
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
  assert abs(em.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1), f"seed {seed}"
  forward, backward = em.frechet_distance(mu1, s1, mu2, s2), em.frechet_distance(mu2, s2, mu1, s1)
  assert forward > 0 and abs(forward - backward) < 1e-9 * forward, f"seed {seed}"


def test_frechet_distance_refuses_mismatched_dimensions():
  with pytest.raises(ValueError, match="same feature layer"):
    em.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _inception_score_reference(logits: np.ndarray, split_size: int) -> float:
  """improved-GAN / ADM: per split of consecutive rows, exp(mean KL(p || mean p)), averaged."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for start in range(0, len(p), split_size):
    part = p[start : start + split_size]
    kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def test_inception_score_matches_reference_across_uneven_batches():
  rng, seed = _rng()
  logits = rng.normal(scale=3.0, size=(23, 11))
  score = em.InceptionScore(split_size=5)
  for part in np.split(logits, [3, 4, 12, 20]):
    score.update(part)
  expected = _inception_score_reference(logits, 5)
  assert abs(score.score() - expected) < 1e-10 * expected, f"seed {seed}"


def test_inception_score_extremes():
  # Confident and spread evenly over K classes -> K; every image predicted alike -> 1.
  classes = 7
  confident = em.InceptionScore()
  confident.update(100.0 * np.eye(classes)[np.arange(70) % classes])
  assert abs(confident.score() - classes) < 1e-6
  alike = em.InceptionScore()
  alike.update(np.tile(np.arange(classes, dtype=np.float64), (50, 1)))
  assert abs(alike.score() - 1.0) < 1e-9


def _precision_recall_reference(ref: np.ndarray, samples: np.ndarray, k: int):
  """Kynkäänniemi et al. 2019 by brute force in float64."""

  def radii(x):
    d = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

  def inside(queries, centres, r):
    d = np.sum((queries[:, None] - centres[None]) ** 2, axis=-1)
    return np.mean(np.any(d <= r[None], axis=1))

  return inside(samples, ref, radii(ref)), inside(ref, samples, radii(samples))


def test_precision_recall_matches_brute_force():
  rng, seed = _rng()
  # Overlapping clusters plus a few far outliers on each side: 0 < precision, recall < 1.
  ref = np.concatenate([rng.normal(size=(55, 5)), rng.normal(size=(5, 5)) - 50.0])
  samples = np.concatenate([rng.normal(loc=0.5, size=(40, 5)), rng.normal(size=(5, 5)) + 50.0])
  got = em.precision_recall(ref, samples, k=3, block=16)  # several blocks
  expected = _precision_recall_reference(ref, samples, 3)
  np.testing.assert_allclose(got, expected, err_msg=f"seed {seed}")
  assert 0 < got[0] < 1 and 0 < got[1] < 1, f"seed {seed}: degenerate case {got}"


def test_precision_recall_identical_and_far_apart():
  rng, seed = _rng()
  ref = rng.normal(size=(40, 6))
  assert em.precision_recall(ref, ref.copy()) == (1.0, 1.0), f"seed {seed}"
  far = rng.normal(size=(30, 6)) + 1000.0
  assert em.precision_recall(ref, far) == (0.0, 0.0), f"seed {seed}"
