"""ε-prediction MSE: the noised input, the times the network sees, and label dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import diffusion
from tests.test_diffusion_schedules import schedule_config

NULL = 10


def make_batch(seed: int, batch: int, shape=(4, 4, 3)):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)
  labels = rng.integers(0, NULL, batch).astype(np.int32)
  return jnp.asarray(x0), jnp.asarray(labels)


@pytest.mark.parametrize("kind", ["discrete", "vpsde"])
def test_perfect_denoiser_has_zero_loss_and_zero_one_loss(kind):
  """A denoiser that recovers ε from (x_t, time) exactly, given x0, has loss 0: so x_t is
  α_t x0 + σ_t ε at the very time the network is told; ε̂ = 0 gives E ε² = 1."""
  seed = int(np.random.SeedSequence().entropy % 2**31)
  schedule = diffusion.create_schedule(schedule_config(kind))
  x0, labels = make_batch(seed, 256)
  scale = 1000.0 if kind == "discrete" else 999.0

  def oracle(x_t, t_net, y):
    t = t_net / scale
    alpha, sigma = schedule.alpha(t)[:, None, None, None], schedule.sigma(t)[:, None, None, None]
    return (x_t - alpha * x0) / sigma

  with jax.enable_x64(True):  # so that 1/σ_t at small t does not amplify float32 rounding
    loss, metrics = diffusion.training_loss(
      oracle,
      schedule,
      x0.astype(jnp.float64),
      labels,
      jax.random.key(seed),
      p_uncond=0.1,
      null_label=NULL,
    )
  assert float(loss) < 1e-10, f"seed {seed}: {float(loss)}"
  assert set(metrics) == {"uncond_fraction"}

  zero = lambda x_t, t_net, y: jnp.zeros_like(x_t)
  loss, _ = diffusion.training_loss(
    zero, schedule, x0, labels, jax.random.key(seed), p_uncond=0.1, null_label=NULL
  )
  # mean of 256·48 squared normals: 1 ± √(2/12288) = 1 ± 0.013; 6 standard deviations.
  assert abs(float(loss) - 1.0) < 0.08, f"seed {seed}: {float(loss)}"


@pytest.mark.parametrize("p_uncond", [0.0, 0.15, 1.0])
def test_label_dropout_and_times_seen_by_the_network(p_uncond):
  seed = int(np.random.SeedSequence().entropy % 2**31)
  schedule = diffusion.create_schedule(schedule_config("discrete"))
  batch = 4000
  x0, labels = make_batch(seed, batch, shape=(1, 1, 1))
  seen = {}

  def spy(x_t, t_net, y):  # called eagerly (no jit), so the arrays are concrete
    seen.update(t=np.asarray(t_net), y=np.asarray(y), dtypes=(t_net.dtype, y.dtype))
    return jnp.zeros_like(x_t)

  _, metrics = diffusion.training_loss(
    spy, schedule, x0, labels, jax.random.key(seed), p_uncond=p_uncond, null_label=NULL
  )
  assert seen["dtypes"] == (jnp.float32, jnp.int32)
  dropped = seen["y"] == NULL
  np.testing.assert_array_equal(seen["y"][~dropped], np.asarray(labels)[~dropped])
  # Binomial(4000, p): 6 standard deviations at most √(4000/4)·6/4000 = 0.048.
  assert abs(dropped.mean() - p_uncond) < 0.05, f"seed {seed}: {dropped.mean()}"
  assert float(metrics["uncond_fraction"]) == pytest.approx(dropped.mean())
  # n ~ U{1..1000}: integers, in range, mean 500.5 ± 6·288.7/√4000 = ±27.
  t = seen["t"]
  np.testing.assert_allclose(t, np.round(t), atol=1e-4, err_msg=f"seed {seed}")
  assert t.min() >= 1 and t.max() <= 1000 and abs(t.mean() - 500.5) < 27, f"seed {seed}"
