"""Sample-quality evaluators, chosen by the config: what `eval.every` measures during training and
what --mode=evaluate measures.

  evaluator = evaluators.create(config)        # None, after one log line, when nothing fits
  results = evaluator(image_batches, labels)   # {"fd_fmnist": 3.1, "precision": ..., ...}
  evaluator.baselines   # the same metrics of held-out real images ("real", the floor) and of
                        # Gaussian noise ("noise"), where the data set allows it

What is measured, first match:
  eval.inception_path and eval.ref_stats set   FID, sFID, IS, precision, recall (any data set)
  data.name == "fashion_mnist"    FD-FMNIST: Fréchet distance in the features of a classifier
                                  trained on the training split; reference: the test split's first
                                  half, floor: its second half
  data.name == "shapes"           FD-shapes: the same with a classifier of the procedural shapes
                                  foreground masks (geometry, not colour)
Classifier evaluators also report IS over the data set's classes and "class_accuracy", the fraction
of samples that the classifier assigns to the class they were drawn for (conditional models).
"""

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np
from absl import logging

from dim_jax import eval_classifier, eval_metrics, sample
from dim_jax.data import fashion_mnist, shapes

# Shapes drawn for the classifier and for the held-out references: indices no training run reads
# (the demo's set holds data.num_examples < 10**7 of them).
SHAPES_HELD_OUT_START = 10**7
SHAPES_CLASSIFIER_EXAMPLES = 4000
SHAPES_CLASSIFIER_RECIPE = dict(eval_classifier.RECIPE, epochs=8)
FMNIST_HALF = 5000  # the test split's halves: reference and floor


@dataclasses.dataclass
class Evaluator:
  """Streams uint8 or [-1, 1] sample batches through `feature_fn` against `ref`."""

  name: str  # the Fréchet distance's name in results: "fid", "fd_fmnist", "fd_shapes"
  feature_fn: eval_metrics.FeatureFn
  ref: eval_metrics.ReferenceStats
  classes_match_labels: bool  # the logits are over the data set's own classes
  baselines: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  def __call__(self, image_batches: Iterable, labels: np.ndarray | None = None) -> dict:
    """Metrics of the images; `labels` (N,), the classes they were drawn for, add class_accuracy."""
    seen, correct = 0, 0
    score_classes = labels is not None and self.classes_match_labels

    def features(images):
      nonlocal seen, correct
      out = self.feature_fn(images)
      if score_classes:  # a padded last batch holds copies past the labels: not counted
        count = min(len(images), len(labels) - seen)
        predicted = np.argmax(np.asarray(out["logits"])[:count], axis=-1)
        correct += int(np.sum(predicted == labels[seen : seen + count]))
        seen += count
      return out

    results = eval_metrics.evaluate_samples(image_batches, features, self.ref)
    results[self.name] = results.pop("fid")
    if score_classes:
      results["class_accuracy"] = correct / max(seen, 1)
    return results

  def summary(self, results: dict) -> str:
    """'fd_fmnist 3.10 [real 0.46, noise 402] | ...' for a log line."""
    parts = []
    for key, value in results.items():
      if key == "num_samples":
        continue
      text = f"{key} {value:.4g}"
      beside = [f"{k} {b[key]:.4g}" for k, b in self.baselines.items() if key in b]
      parts.append(text + (f" [{', '.join(beside)}]" if beside else ""))
    return " | ".join(parts)


def _batches(images: np.ndarray, size: int = 500):
  return (images[i : i + size] for i in range(0, len(images), size))


def _noise_images(count: int, shape: tuple, seed: int = 0) -> np.ndarray:
  """What a sampler that removed no noise would give: N(0, 1) pixels as uint8 (B, *shape)."""
  rng = np.random.default_rng(seed)
  return sample.to_uint8(rng.standard_normal((count, *shape), dtype=np.float32))


def _classifier_evaluator(
  name: str,
  classifier_name: str,
  load_training_set: Callable,
  reference: tuple[np.ndarray, np.ndarray],
  floor: tuple[np.ndarray, np.ndarray],
  *,
  image_size: int,
  in_channels: int,
  num_classes: int,
  cache_dir: str,
  recipe: dict = eval_classifier.RECIPE,
  preprocess: Callable = lambda images: images,
) -> Evaluator:
  """An evaluator in a cached classifier's features; reference and floor are (uint8 images,
  labels) of held-out real images, the floor scored like samples to give the real baseline.
  The classifier sees `preprocess(images)`, uint8 (B, h, w, C) -> uint8 (B, h, w, in_channels)."""

  def training_set():
    images, labels = load_training_set()
    return preprocess(images), labels

  model = eval_classifier.load_or_train(
    cache_dir,
    classifier_name,
    training_set,
    image_size=image_size,
    in_channels=in_channels,
    num_classes=num_classes,
    recipe=recipe,
  )
  classifier_features = eval_classifier.make_feature_fn(model, image_size)
  feature_fn = lambda images: classifier_features(preprocess(np.asarray(images)))
  ref = eval_metrics.compute_reference_stats(
    _batches(reference[0]), feature_fn, manifold_size=len(reference[0])
  )
  evaluator = Evaluator(name, feature_fn, ref, classes_match_labels=True)
  floor_images, floor_labels = floor
  noise = _noise_images(len(floor_images), (image_size, image_size, floor_images.shape[-1]))
  evaluator.baselines = {
    "real": evaluator(_batches(floor_images), floor_labels),
    "noise": evaluator(_batches(noise), np.arange(len(noise)) % num_classes),
  }
  logging.info(
    "Evaluator %s: %d reference images; held-out real images score %s; noise scores %s",
    name,
    len(reference[0]),
    _plain(evaluator.baselines["real"]),
    _plain(evaluator.baselines["noise"]),
  )
  return evaluator


def _plain(results: dict) -> str:
  return ", ".join(f"{k} {v:.4g}" for k, v in results.items() if k != "num_samples")


def _fashion_mnist(config, count: int, cache_dir: str) -> Evaluator:
  data_dir = config.data.data_dir or fashion_mnist.DEFAULT_DIR
  image_size = config.data.image_size
  test = fashion_mnist.FashionMnistSource(data_dir, "test", image_size)
  count = min(count, FMNIST_HALF)
  images, labels = test.images[..., None], test.labels  # (10000, 28, 28, 1): unpadded

  def training_set():
    train = fashion_mnist.FashionMnistSource(data_dir, "train", image_size)
    return train.images[..., None], train.labels

  return _classifier_evaluator(
    "fd_fmnist",
    "fashion_mnist",
    training_set,
    (images[:count], labels[:count]),
    (images[FMNIST_HALF : FMNIST_HALF + count], labels[FMNIST_HALF : FMNIST_HALF + count]),
    image_size=image_size,
    in_channels=1,
    num_classes=test.num_classes,
    cache_dir=cache_dir,
  )


def _shapes(config, count: int, cache_dir: str) -> Evaluator:
  image_size = config.data.image_size
  source = shapes.ShapesSource(
    SHAPES_HELD_OUT_START * 2,
    image_size,
    random_flip=False,
    colours=config.data.shape_colours,
    rotate=config.data.rotate_shapes,
  )

  def draw(start: int, num: int):
    examples = [source[i] for i in range(start, start + num)]
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])

  # The classifier sees the foreground mask: shape, not colour (a network on the raw colours
  # learns the shapes far more slowly). Colour is left to the eye and the grid.
  return _classifier_evaluator(
    "fd_shapes",
    f"shapes{image_size}_{'rotated' if config.data.rotate_shapes else 'upright'}_mask",
    lambda: draw(0, SHAPES_CLASSIFIER_EXAMPLES),
    draw(SHAPES_HELD_OUT_START, count),
    draw(SHAPES_HELD_OUT_START + count, count),
    image_size=image_size,
    in_channels=1,
    num_classes=source.num_classes,
    cache_dir=cache_dir,
    recipe=SHAPES_CLASSIFIER_RECIPE,
    preprocess=shapes.foreground_mask,
  )


CLASSIFIER_SETS = {"fashion_mnist": _fashion_mnist, "shapes": _shapes}


def cache_dir(eval_config) -> str:
  """Where trained classifiers are kept: eval.cache_dir, or ~/.cache/dim_jax."""
  return eval_config.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dim_jax")


def create(config) -> Evaluator | None:
  """The evaluator that fits `config` (module docstring), or None after a log line saying why."""
  eval_config = config.eval
  if eval_config.inception_path and eval_config.ref_stats:
    from dim_jax.models import inception

    feature_fn = inception.make_feature_fn(inception.load_inception(eval_config.inception_path))
    ref = eval_metrics.load_reference_stats(eval_config.ref_stats, feature_fn)
    return Evaluator("fid", feature_fn, ref, classes_match_labels=False)
  if config.data.name in CLASSIFIER_SETS:
    build = CLASSIFIER_SETS[config.data.name]
    return build(config, eval_config.num_samples, cache_dir(eval_config))
  logging.info(
    "Evaluation: no sample-quality metric for data.name=%r without Inception weights; set "
    "eval.inception_path and eval.ref_stats for FID. Only sample grids are written.",
    config.data.name,
  )
  return None
