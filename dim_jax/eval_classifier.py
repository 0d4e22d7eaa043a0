"""A small classifier of a labelled image set whose features give an offline Fréchet distance.

No Inception weights exist offline, so development runs measure sample quality with a network
trained on the data set itself: the Fréchet distance between its penultimate features (the
analogue of Inception's pool_3) on generated and on real images, e.g. "FD-FMNIST" for
Fashion-MNIST; its logits give the class accuracy of conditional samples. Trained once, then cached
as an `.npz` whose name holds the data set and the recipe; `make_feature_fn` plugs it into
eval_metrics.evaluate_samples as the feature_fn (pool features and logits).

Input: uint8 (B, h, w, C) images with h, w <= image_size; smaller ones (Fashion-MNIST's 28²) are
zero-padded to image_size², exactly as the data pipeline pads them, so black borders are judged too.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dim_jax.data import preprocess

# The cache file's name holds the recipe, so changing it never loads a stale network.
RECIPE = dict(width=32, features=128, epochs=3, batch_size=128, learning_rate=1e-3, seed=0)


class Classifier(nnx.Module):
  """Two 3x3 conv + ReLU + 2x2 average-pool stages (S² -> S²/4 -> S²/16), a dense ReLU layer whose
  output is the feature vector, and a linear head over the classes."""

  def __init__(
    self,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    width: int = 32,
    features: int = 128,
    rngs: nnx.Rngs,
  ):
    if image_size % 4:
      raise ValueError(f"classifier image_size={image_size} must be a multiple of 4.")
    self.conv1 = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    self.dense = nnx.Linear((image_size // 4) ** 2 * 2 * width, features, rngs=rngs)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(B, S, S, C) in [-1, 1] -> (B, features), the penultimate layer."""
    x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))  # (B, S/2, S/2, w)
    x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))  # (B, S/4, S/4, 2w)
    return jax.nn.relu(self.dense(x.reshape(len(x), -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))  # (B, num_classes) logits


def prepare_images(images: np.ndarray, image_size: int, in_channels: int) -> np.ndarray:
  """uint8 (B, h, w, C) -> float32 (B, image_size, image_size, C) in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != in_channels or images.dtype != np.uint8:
    raise ValueError(
      f"classifier input {images.dtype} {images.shape}: give uint8 (B, H, W, {in_channels})."
    )
  if images.shape[1:3] != (image_size, image_size):
    images = np.stack([preprocess.pad_to_size(image, image_size) for image in images])
  return preprocess.to_unit_range(images)


def train(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  image_size: int,
  num_classes: int,
  width,
  features,
  epochs,
  batch_size,
  learning_rate,
  seed,
) -> Classifier:
  """uint8 (N, h, w, C) images, (N,) labels -> a Classifier trained with Adam on cross-entropy."""
  in_channels = images.shape[-1]
  model = Classifier(
    image_size=image_size,
    in_channels=in_channels,
    num_classes=num_classes,
    width=width,
    features=features,
    rngs=nnx.Rngs(seed),
  )
  graphdef, params = nnx.split(model)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x_all = prepare_images(images, image_size, in_channels)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x_all))
    for start in range(0, len(order) - batch_size + 1, batch_size):  # whole batches: one compile
      index = order[start : start + batch_size]
      params, opt_state = step(params, opt_state, x_all[index], labels[index].astype(np.int32))
  return nnx.merge(graphdef, params)


def save(model: Classifier, path: str) -> None:
  """Parameters as an .npz keyed by their NNX path ('conv1.kernel', ...). Written beside `path`
  and renamed into place, so that processes sharing the cache never read half a file."""
  flat = nnx.to_flat_state(nnx.state(model))
  partial = f"{path}.{os.getpid()}.partial.npz"
  np.savez(partial, **{".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat})
  os.replace(partial, path)


def load(path: str, **shape) -> Classifier:
  """The classifier saved at `path`; `shape` holds Classifier's keyword arguments but rngs."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Classifier(**shape, rngs=nnx.Rngs(0))))
  with np.load(path) as arrays:
    flat = [
      (p, v.replace(jnp.asarray(arrays[".".join(map(str, p))])))
      for p, v in nnx.to_flat_state(state)
    ]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def cache_path(cache_dir: str, name: str, recipe: dict = RECIPE) -> str:
  tag = "_".join(f"{k}{v}" for k, v in sorted(recipe.items()))
  return os.path.join(cache_dir, f"{name}_classifier_{tag}.npz")


def load_or_train(
  cache_dir: str,
  name: str,
  load_training_set,
  *,
  image_size: int,
  in_channels: int,
  num_classes: int,
  recipe: dict = RECIPE,
) -> Classifier:
  """The cached classifier of data set `name` and `recipe`; trained on the (images, labels) that
  `load_training_set()` returns when the cache has none."""
  path = cache_path(cache_dir, name, recipe)
  shape = dict(image_size=image_size, in_channels=in_channels, num_classes=num_classes)
  if not os.path.isfile(path):
    images, labels = load_training_set()
    model = train(images, labels, image_size=image_size, num_classes=num_classes, **recipe)
    os.makedirs(cache_dir, exist_ok=True)
    save(model, path)
  return load(path, **shape, width=recipe["width"], features=recipe["features"])


def make_feature_fn(model: Classifier, image_size: int):
  """uint8 images -> {"pool": (B, features) penultimate features, "logits": (B, classes)}."""
  graphdef, state = nnx.split(model)
  in_channels = model.conv1.in_features

  @jax.jit
  def features(state, x):
    model = nnx.merge(graphdef, state)
    pool = model.features(x)
    return dict(pool=pool, logits=model.head(pool))

  return lambda images: features(state, prepare_images(images, image_size, in_channels))


def accuracy(feature_fn, images: np.ndarray, labels: np.ndarray, batch_size=1000) -> float:
  """Fraction of `images` whose logits under `feature_fn` pick their `labels`."""
  correct = 0
  for start in range(0, len(images), batch_size):
    logits = feature_fn(images[start : start + batch_size])["logits"]
    correct += int(np.sum(np.argmax(logits, axis=-1) == labels[start : start + batch_size]))
  return correct / len(images)
