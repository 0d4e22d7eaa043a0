"""A small Fashion-MNIST classifier whose penultimate features give FD-FMNIST, an FID stand-in.

No Inception weights exist offline, so development runs measure sample quality with this network
instead: the Fréchet distance between its penultimate features (128-d, the analogue of
Inception's pool_3) on generated and on real images ("FD-FMNIST"). Trained once on the 60 000
training images, then cached as an `.npz` under a given directory; `make_feature_fn` plugs it
into eval_metrics.evaluate_samples as the feature_fn (pool features and 10-class logits).

Input: uint8 (B, 28 or 32, 28 or 32, 1) images; 28² images are zero-padded to 32², exactly as
the fashion_mnist recipe's data pipeline pads them, so black borders are part of what is judged.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dim_jax.data import fashion_mnist, preprocess

IMAGE_SIZE = 32
NUM_CLASSES = 10
# The cache file's name holds the recipe, so changing it never loads a stale network.
RECIPE = dict(width=32, features=128, epochs=3, batch_size=128, learning_rate=1e-3, seed=0)


class Classifier(nnx.Module):
  """Two 3x3 conv + ReLU + 2x2 average-pool stages (32² -> 16² -> 8²), a dense ReLU layer whose
  output is the feature vector, and a linear 10-class head."""

  def __init__(self, width: int = 32, features: int = 128, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(8 * 8 * 2 * width, features, rngs=rngs)
    self.head = nnx.Linear(features, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(B, 32, 32, 1) in [-1, 1] -> (B, features), the penultimate layer."""
    x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))  # (B, 16, 16, w)
    x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))  # (B, 8, 8, 2w)
    return jax.nn.relu(self.dense(x.reshape(len(x), -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))  # (B, 10) logits


def prepare_images(images: np.ndarray) -> np.ndarray:
  """uint8 (B, 28 or 32, 28 or 32, 1) -> float32 (B, 32, 32, 1) in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 1 or images.dtype != np.uint8:
    raise ValueError(
      f"Fashion-MNIST classifier input {images.dtype} {images.shape}: give uint8 (B, H, W, 1)."
    )
  if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    images = np.stack([preprocess.pad_to_size(image, IMAGE_SIZE) for image in images])
  return preprocess.to_unit_range(images)


def train(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  width,
  features,
  epochs,
  batch_size,
  learning_rate,
  seed,
):
  """uint8 (N, H, W, 1) images, (N,) labels -> a Classifier trained with Adam on cross-entropy."""
  model = Classifier(width, features, rngs=nnx.Rngs(seed))
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

  x_all = prepare_images(images)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x_all))
    for start in range(0, len(order) - batch_size + 1, batch_size):  # whole batches: one compile
      index = order[start : start + batch_size]
      params, opt_state = step(params, opt_state, x_all[index], labels[index].astype(np.int32))
  return nnx.merge(graphdef, params)


def save(model: Classifier, path: str) -> None:
  """Parameters as an .npz keyed by their NNX path ('conv1.kernel', ...)."""
  flat = nnx.to_flat_state(nnx.state(model))
  np.savez(path, **{".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat})


def load(path: str, width: int, features: int) -> Classifier:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Classifier(width, features, rngs=nnx.Rngs(0))))
  with np.load(path) as arrays:
    flat = [
      (p, v.replace(jnp.asarray(arrays[".".join(map(str, p))])))
      for p, v in nnx.to_flat_state(state)
    ]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def cache_path(cache_dir: str, recipe: dict = RECIPE) -> str:
  tag = "_".join(f"{k}{v}" for k, v in sorted(recipe.items()))
  return os.path.join(cache_dir, f"fmnist_classifier_{tag}.npz")


def load_or_train(
  cache_dir: str, data_dir: str = fashion_mnist.DEFAULT_DIR, recipe: dict = RECIPE
) -> Classifier:
  """The cached classifier of `recipe`, trained on the Fashion-MNIST training split if absent."""
  path = cache_path(cache_dir, recipe)
  if not os.path.isfile(path):
    source = fashion_mnist.FashionMnistSource(data_dir, "train", IMAGE_SIZE)
    model = train(source.images[..., None], source.labels, **recipe)
    os.makedirs(cache_dir, exist_ok=True)
    save(model, path)
  return load(path, recipe["width"], recipe["features"])


def make_feature_fn(model: Classifier):
  """uint8 images -> {"pool": (B, features) penultimate features, "logits": (B, 10)}."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def features(state, x):
    model = nnx.merge(graphdef, state)
    pool = model.features(x)
    return dict(pool=pool, logits=model.head(pool))

  return lambda images: features(state, prepare_images(images))


def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray, batch_size=1000) -> float:
  """Fraction of `images` classified as their `labels`."""
  feature_fn = make_feature_fn(model)
  correct = 0
  for start in range(0, len(images), batch_size):
    logits = feature_fn(images[start : start + batch_size])["logits"]
    correct += int(np.sum(np.argmax(logits, axis=-1) == labels[start : start + batch_size]))
  return correct / len(images)
