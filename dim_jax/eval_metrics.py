"""Sample-quality metrics as the field computes them: FID, sFID, Inception Score, precision, recall.

Each metric consumes features from a `feature_fn`: uint8 images (B, H, W, C) -> a mapping with
  "pool"    (B, D)    -> FID (Heusel et al. 2017), precision and recall;
  "spatial" (B, D_s)  -> sFID (Nash et al. 2021), optional;
  "logits"  (B, K)    -> Inception Score (Salimans et al. 2016), optional.
`models.inception.make_feature_fn` gives the FID Inception's (2048, 2023, 1008); the data-set
classifiers of `eval_classifier` give small offline stand-ins (FD-FMNIST, FD-shapes).

Entry points:
  evaluate_samples(sample_batches, feature_fn, ref) -> {"fid", "sfid", "inception_score",
      "precision", "recall", "num_samples"}: streams the batches once; means and covariances are
      accumulated batch by batch (float64), so no set of features is ever held, except up to
      `manifold_size` pool features (8 KiB each for Inception) for precision / recall;
  compute_reference_stats(image_batches, feature_fn) -> ReferenceStats; save_reference_stats;
  load_reference_stats(path) reads ADM's reference batches (mu, sigma, mu_s, sigma_s, arr_0
      images) and U-ViT's / pytorch-fid's fid_stats_*.npz (mu, sigma), and this module's own files.
Images may be uint8 or float in [-1, 1]; floats are rounded to uint8 first (sample.to_uint8), as
the field saves samples to PNG before measuring them.
"""

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax import sample

FeatureFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]
REF_HELP = (
  "make it with --mode=ref_stats (eval_metrics.compute_reference_stats) or use U-ViT's "
  "fid_stats_*.npz / ADM's VIRTUAL_*.npz reference batch"
)

# ---------------------------------------------------------------- Fréchet distance (FID, sFID)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix (eigh, float64)."""
  eigvals, eigvecs = np.linalg.eigh(np.asarray(matrix, np.float64))
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((Σ1 Σ2)^½) of two covariances, through the symmetric Σ1^½ Σ2 Σ1^½.

  Σ1 Σ2 and Σ1^½ Σ2 Σ1^½ are similar, so they share their (real, non-negative) eigenvalues; the
  symmetric form needs only eigh, stays real when the covariances are singular (fewer samples than
  dimensions), and avoids scipy.linalg.sqrtm's Schur iterations on a non-symmetric product.
  """
  root1 = sqrtm_psd(sigma1)
  inner = root1 @ np.asarray(sigma2, np.float64) @ root1
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2.0)
  return float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """d² = |μ1 - μ2|² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) between two Gaussians (Heusel et al. 2017)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  dim = len(mu1)
  if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
    raise ValueError(
      f"Fréchet distance of mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma "
      f"{sigma1.shape} vs {sigma2.shape}; both sides must come from the same feature layer."
    )
  diff = mu1 - mu2
  trace = np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  return float(diff @ diff + trace)


class StreamingMoments:
  """Mean and covariance of feature rows, merged batch by batch (Chan, Golub & LeVeque 1979).

  Each batch is centred on its own mean before its scatter matrix is added, so the float64 sums
  never cancel the way Σx xᵀ - n μ μᵀ does. `merge` combines accumulators of disjoint sets (e.g.
  of several hosts).
  """

  def __init__(self, dim: int):
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.scatter = np.zeros((dim, dim), np.float64)  # Σ (x - mean)(x - mean)ᵀ

  def merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    if count == 0:
      return
    total = self.count + count
    delta = mean - self.mean
    self.scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
    self.mean += delta * (count / total)
    self.count = total

  def update(self, features: np.ndarray) -> None:
    """Adds (B, D) feature rows."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    self.merge(len(x), batch_mean, centred.T @ centred)

  def covariance(self) -> np.ndarray:
    """The unbiased (N - 1) covariance, as np.cov."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 samples; got {self.count}.")
    return self.scatter / (self.count - 1)


# ---------------------------------------------------------------- Inception Score


class InceptionScore:
  """exp(E_x KL(p(y|x) ‖ p(y))) on consecutive splits of `split_size` samples, averaged.

  Salimans et al. 2016 (improved-GAN's code), with ADM's split of 5000: the last, shorter split
  counts as one. Per split only Σ p(y|x) and Σ_x Σ_y p log p are kept:
  mean KL = (1/n) Σ_x Σ_y p log p - Σ_y p̄ log p̄, with p̄ the split's mean prediction.
  """

  def __init__(self, split_size: int = 5000):
    if split_size < 1:
      raise ValueError(f"split_size={split_size}: use a positive number of samples per split.")
    self.split_size = split_size
    self.splits: list[list] = []  # [count, Σ p (K,), Σ p log p]

  def update(self, logits: np.ndarray) -> None:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))  # (B, K) log-softmax
    start = 0
    while start < len(log_p):
      if not self.splits or self.splits[-1][0] == self.split_size:
        self.splits.append([0, np.zeros(log_p.shape[1]), 0.0])
      split = self.splits[-1]
      part = log_p[start : start + self.split_size - split[0]]
      p = np.exp(part)
      split[0] += len(part)
      split[1] += p.sum(axis=0)
      split[2] += float(np.sum(p * part))
      start += len(part)

  def score(self) -> float:
    if not self.splits:
      raise ValueError("Inception Score of no samples: give at least one batch.")
    scores = []
    for count, p_sum, neg_entropy_sum in self.splits:
      p_mean = p_sum / count
      marginal = np.sum(p_mean * np.log(np.where(p_mean > 0, p_mean, 1.0)))
      scores.append(np.exp(neg_entropy_sum / count - marginal))
    return float(np.mean(scores))


# ---------------------------------------------------------------- precision and recall


@jax.jit
def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """(N, D), (M, D) -> (N, M) squared Euclidean distances, float32."""
  dot = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  norms_a, norms_b = jnp.sum(a * a, axis=1), jnp.sum(b * b, axis=1)
  return jnp.maximum(norms_a[:, None] - 2.0 * dot + norms_b[None, :], 0.0)


def _row_blocks(count: int, block: int):
  return ((start, min(start + block, count)) for start in range(0, count, block))


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 4096) -> np.ndarray:
  """(N, D) -> (N,) squared distance of each point to its k-th nearest other point.

  As Kynkäänniemi et al. 2019 and ADM's ManifoldEstimator: the point itself is the 0th neighbour.
  """
  if len(features) <= k:
    raise ValueError(f"a k={k} nearest-neighbour manifold needs more than {k} points.")
  points = jnp.asarray(features, jnp.float32)
  radii = []
  for start, end in _row_blocks(len(points), block):
    nearest = -jax.lax.top_k(-_squared_distances(points[start:end], points), k + 1)[0]
    radii.append(np.asarray(nearest[:, k]))
  return np.concatenate(radii)


def _fraction_inside(queries: jax.Array, centres: jax.Array, radii: jax.Array, block: int) -> float:
  """Fraction of queries within radius of at least one centre (all squared distances)."""
  inside = 0
  for start, end in _row_blocks(len(queries), block):
    within = _squared_distances(queries[start:end], centres) <= radii[None, :]
    inside += int(jnp.sum(jnp.any(within, axis=1)))
  return inside / len(queries)


def precision_recall(
  ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3, block: int = 4096
) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), k = 3 as ADM's evaluator.

  precision: fraction of samples inside the reference manifold (the union of balls around each
  reference point reaching its k-th neighbour); recall: fraction of references inside the
  samples' manifold.
  """
  ref = jnp.asarray(ref_features, jnp.float32)
  samples = jnp.asarray(sample_features, jnp.float32)
  ref_radii = jnp.asarray(manifold_radii(ref, k, block))
  sample_radii = jnp.asarray(manifold_radii(samples, k, block))
  precision = _fraction_inside(samples, ref, ref_radii, block)
  recall = _fraction_inside(ref, samples, sample_radii, block)
  return precision, recall


# ---------------------------------------------------------------- reference statistics


@dataclasses.dataclass
class ReferenceStats:
  """What a sample set is compared with: pool Gaussian, optional spatial Gaussian and features."""

  mu: np.ndarray  # (D,)
  sigma: np.ndarray  # (D, D)
  mu_s: np.ndarray | None = None  # (D_s,) spatial, for sFID
  sigma_s: np.ndarray | None = None  # (D_s, D_s)
  features: np.ndarray | None = None  # (N, D) pool features, for precision / recall


def iterate_features(image_batches: Iterable, feature_fn: FeatureFn):
  """Batches of uint8 or [-1, 1] images -> feature dicts of host float arrays, one per batch.

  A short last batch is padded to the first batch's size (with copies of its last image) and the
  padding's features dropped, so a jitted feature_fn compiles once and a sharded batch still
  divides over the devices.
  """
  batch_size = None
  for images in image_batches:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      images = sample.to_uint8(images)
    count = len(images)
    batch_size = batch_size or count
    if count < batch_size:
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - count, axis=0)])
    features = feature_fn(images)
    yield {name: np.asarray(value)[:count] for name, value in features.items()}


def compute_reference_stats(
  image_batches: Iterable, feature_fn: FeatureFn, manifold_size: int = 10_000
) -> ReferenceStats:
  """Real images -> ReferenceStats; keeps the first `manifold_size` pool features (ADM: 10 000)."""
  pool = spatial = None
  kept, num_kept = [], 0
  for features in iterate_features(image_batches, feature_fn):
    pool = pool or StreamingMoments(features["pool"].shape[1])
    pool.update(features["pool"])
    if "spatial" in features:
      spatial = spatial or StreamingMoments(features["spatial"].shape[1])
      spatial.update(features["spatial"])
    if num_kept < manifold_size:
      kept.append(features["pool"][: manifold_size - num_kept])
      num_kept += len(kept[-1])
  if pool is None:
    raise ValueError("reference statistics of no images: the image iterator was empty.")
  return ReferenceStats(
    mu=pool.mean,
    sigma=pool.covariance(),
    mu_s=None if spatial is None else spatial.mean,
    sigma_s=None if spatial is None else spatial.covariance(),
    features=np.concatenate(kept) if manifold_size > 0 else None,
  )


def save_reference_stats(path: str, stats: ReferenceStats) -> None:
  """Writes mu, sigma (and mu_s, sigma_s, features when present) as ADM's key names."""
  arrays = {k: v for k, v in dataclasses.asdict(stats).items() if v is not None}
  np.savez(path, **arrays)


def load_reference_stats(
  path: str, feature_fn: FeatureFn | None = None, batch_size: int = 250
) -> ReferenceStats:
  """An ADM / U-ViT / pytorch-fid / own `.npz` -> ReferenceStats.

  Precision and recall need reference features: read from `features`, or computed with
  `feature_fn` from ADM's reference images `arr_0` when given; else they are left out.
  """
  if not os.path.isfile(path):
    raise ValueError(f"reference statistics {path!r} not found: {REF_HELP}.")
  with np.load(path) as data:
    if "mu" not in data or "sigma" not in data:
      raise ValueError(f"{path!r} holds {sorted(data.keys())}, no mu and sigma: {REF_HELP}.")
    stats = ReferenceStats(
      **{f.name: data[f.name] for f in dataclasses.fields(ReferenceStats) if f.name in data}
    )
    if stats.features is None and "arr_0" in data and feature_fn is not None:
      images = data["arr_0"]  # (N, H, W, 3) uint8
      batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
      stats.features = np.concatenate([f["pool"] for f in iterate_features(batches, feature_fn)])
  return stats


# ---------------------------------------------------------------- evaluation


def evaluate_samples(
  sample_batches: Iterable,
  feature_fn: FeatureFn,
  ref: ReferenceStats,
  *,
  manifold_size: int = 50_000,
  split_size: int = 5000,
  k: int = 3,
) -> dict[str, float]:
  """Streams sample batches once -> {"fid", "sfid", "inception_score", "precision", "recall"}.

  sFID needs the reference's mu_s / sigma_s and a "spatial" feature; IS a "logits" feature;
  precision / recall the reference's features, against the first `manifold_size` samples. Metrics
  whose inputs are absent are left out of the result. "num_samples" counts the samples read.
  """
  pool = spatial = None
  inception_score = InceptionScore(split_size)
  kept, num_kept = [], 0
  want_manifold = ref.features is not None and manifold_size > 0
  for features in iterate_features(sample_batches, feature_fn):
    pool = pool or StreamingMoments(features["pool"].shape[1])
    pool.update(features["pool"])
    if "spatial" in features and ref.mu_s is not None:
      spatial = spatial or StreamingMoments(features["spatial"].shape[1])
      spatial.update(features["spatial"])
    if "logits" in features:
      inception_score.update(features["logits"])
    if want_manifold and num_kept < manifold_size:
      kept.append(features["pool"][: manifold_size - num_kept])
      num_kept += len(kept[-1])
  if pool is None:
    raise ValueError("evaluation of no samples: the sample iterator was empty.")
  results = {"num_samples": pool.count}
  results["fid"] = frechet_distance(pool.mean, pool.covariance(), ref.mu, ref.sigma)
  if spatial is not None:
    results["sfid"] = frechet_distance(spatial.mean, spatial.covariance(), ref.mu_s, ref.sigma_s)
  if inception_score.splits:
    results["inception_score"] = inception_score.score()
  if want_manifold:
    precision, recall = precision_recall(ref.features, np.concatenate(kept), k=k)
    results.update(precision=precision, recall=recall)
  return results
