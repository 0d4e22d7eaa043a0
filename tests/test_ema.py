"""The EMA of the weights is the intended average of the trajectory from step 1, not of the init."""

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax import data, diffusion, sample, train, train_state
from tests.test_train import tiny_config


def _expected_ema(trajectory: list, decay: float) -> list:
  """Σ_i w_i p_i over the parameters p_0 (init) ... p_k, in float64, with the warm-up decay
  d_j = min(decay, (1 + j) / (10 + j)) of update j:
  w_0 = Π_j d_j and w_i = (1 - d_{i-1}) Π_{j>=i} d_j."""
  k = len(trajectory) - 1
  d = np.minimum(decay, (1.0 + np.arange(k)) / (10.0 + np.arange(k)))
  weights = [np.prod(d)] + [(1 - d[i - 1]) * np.prod(d[i:]) for i in range(1, k + 1)]
  assert abs(sum(weights) - 1) < 1e-12
  leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(p)] for p in trajectory]
  return [
    sum(w * p[n] for w, p in zip(weights, leaves, strict=True)) for n in range(len(leaves[0]))
  ]


def test_ema_is_the_warmed_up_average_of_the_trajectory():
  config = tiny_config(num_steps=0)
  config.optim.update(ema_decay=0.9, warmup_steps=1, learning_rate=1e-2)  # d reached at step 80
  graphdef, init_state, tx, lr_schedule = train_state.build_state(config)
  step = jax.jit(
    train.make_train_step(
      config, graphdef, tx, lr_schedule, diffusion.create_schedule(config.diffusion)
    )
  )
  state = jax.jit(init_state)()
  batches = data.create_train_iterator(
    config.data, batch_size=config.train.batch_size, seed=int(np.random.randint(1 << 30))
  )
  trajectory = [state["params"]]
  for _ in range(12):
    state, _ = step(state, jax.tree.map(jnp.asarray, next(batches)))
    trajectory.append(state["params"])
  expected = _expected_ema(trajectory, config.optim.ema_decay)
  for got, want in zip(jax.tree.leaves(state["ema_params"]), expected, strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)
  # The initial weights are all but gone: their weight is Π d_j = 1/10 · 2/11 · ... after 12 steps.
  first = [np.asarray(x) for x in jax.tree.leaves(trajectory[0])]
  last = [np.asarray(x) for x in jax.tree.leaves(trajectory[-1])]
  ema = [np.asarray(x) for x in jax.tree.leaves(state["ema_params"])]
  dist = lambda a, b: sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
  assert dist(ema, last) < 0.1 * dist(first, last)


def test_short_run_ema_samples_are_nearer_the_trained_models_than_the_initial_ones(tmp_path):
  config = tiny_config(num_steps=30)
  config.optim.learning_rate = 2e-3
  config.sample.num_images = 0
  state = train.train_and_evaluate(config, str(tmp_path))
  graphdef, init_state, _, _ = train_state.build_state(config)
  run = sample.make_sampler(
    graphdef, diffusion.create_schedule(config.diffusion), config.sample, config.model.num_classes
  )
  side = config.model.input_size
  noise = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (8, side, side, 3))
  labels = jnp.arange(8) % config.model.num_classes
  draw = lambda params: np.asarray(run(params, noise, labels, jax.random.key(1)))
  raw, ema = draw(state["params"]), draw(state["ema_params"])
  initial = draw(jax.jit(init_state)()["params"])
  assert np.mean((ema - raw) ** 2) < 0.5 * np.mean((initial - raw) ** 2)
