"""The discrete and VP-SDE schedules against hand-computed ᾱ, closed forms and VP identities."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dim_jax import diffusion


def schedule_config(kind: str, num_timesteps: int = 1000) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      schedule=kind,
      num_timesteps=num_timesteps,
      beta_start=0.00085,
      beta_end=0.012,
      beta_min=0.1,
      beta_max=20.0,
    )
  )


@pytest.fixture
def np_rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def hand_alpha_bar(num_timesteps: int) -> np.ndarray:
  """ᾱ_0..ᾱ_N from Stable Diffusion's betas, one product at a time (float64)."""
  alpha_bar = [1.0]
  for n in range(num_timesteps):
    sqrt_beta = 0.00085**0.5 + n / (num_timesteps - 1) * (0.012**0.5 - 0.00085**0.5)
    alpha_bar.append(alpha_bar[-1] * (1.0 - sqrt_beta**2))
  return np.array(alpha_bar)


def test_discrete_alpha_bar_matches_the_betas():
  with jax.enable_x64(True):
    schedule = diffusion.create_schedule(schedule_config("discrete"))
    steps = np.arange(1001) / 1000.0
    alpha_sq = np.asarray(schedule.alpha(steps)) ** 2
  np.testing.assert_allclose(alpha_sq, hand_alpha_bar(1000), rtol=1e-12)
  # The last ᾱ of Stable Diffusion's schedule, as published: 0.0047 (terminal SNR is not zero).
  assert abs(alpha_sq[-1] - 0.0047) < 5e-5


def test_discrete_log_alpha_is_linear_between_steps(np_rng):
  rng, seed = np_rng
  t = rng.uniform(0.0, 1.0, 64)
  with jax.enable_x64(True):
    schedule = diffusion.create_schedule(schedule_config("discrete"))
    got = np.asarray(schedule.log_alpha(t))
  want = np.interp(t, np.arange(1001) / 1000.0, 0.5 * np.log(hand_alpha_bar(1000)))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14, err_msg=f"seed {seed}")


def test_vpsde_matches_the_integrated_beta(np_rng):
  """ᾱ_t = exp(-∫_0^t β), β(s) = β_min + s (β_max - β_min) (Song et al. 2021, eq. 33)."""
  rng, seed = np_rng
  t = rng.uniform(0.0, 1.0, 64)
  with jax.enable_x64(True):
    schedule = diffusion.create_schedule(schedule_config("vpsde"))
    alpha_sq = np.asarray(schedule.alpha(t)) ** 2
    beta = np.asarray(schedule.beta(t))
  integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
  np.testing.assert_allclose(alpha_sq, np.exp(-integral), rtol=1e-12, err_msg=f"seed {seed}")
  np.testing.assert_allclose(beta, 0.1 + t * 19.9, rtol=1e-12, err_msg=f"seed {seed}")


@pytest.mark.parametrize("kind", ["discrete", "vpsde"])
def test_vp_identities_and_monotone_lambda(kind, np_rng):
  rng, seed = np_rng
  t = np.sort(rng.uniform(1e-3, 1.0, 256))
  schedule = diffusion.create_schedule(schedule_config(kind))
  alpha, sigma = np.asarray(schedule.alpha(t)), np.asarray(schedule.sigma(t))
  assert alpha.dtype == sigma.dtype == np.float32  # float32 unless asked for more
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6, err_msg=f"seed {seed}")
  with jax.enable_x64(True):
    alpha, sigma = np.asarray(schedule.alpha(t)), np.asarray(schedule.sigma(t))
    lam = np.asarray(schedule.lambda_(t))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-14, err_msg=f"seed {seed}")
  np.testing.assert_allclose(lam, np.log(alpha / sigma), atol=1e-12, err_msg=f"seed {seed}")
  assert np.all(np.diff(lam) < 0), f"λ not strictly decreasing (seed {seed})"
  assert np.all(np.diff(alpha) < 0) and np.all(np.diff(sigma) > 0), f"seed {seed}"


@pytest.mark.parametrize("kind", ["discrete", "vpsde"])
def test_beta_is_minus_twice_the_slope_of_log_alpha(kind, np_rng):
  rng, seed = np_rng
  t = rng.uniform(2e-3, 0.998, 32)
  dt = 1e-7
  with jax.enable_x64(True):
    schedule = diffusion.create_schedule(schedule_config(kind))
    slope = (np.asarray(schedule.log_alpha(t + dt)) - np.asarray(schedule.log_alpha(t - dt))) / (
      2 * dt
    )
    beta = np.asarray(schedule.beta(t))
  # Away from the discrete steps, where the slope jumps (no t here is within dt of one).
  off_steps = np.abs(t * 1000 - np.round(t * 1000)) > 1e-3
  np.testing.assert_allclose(beta[off_steps], -2 * slope[off_steps], rtol=1e-5, err_msg=str(seed))
  if kind == "discrete":  # step n's interval: -N log(1 - β_n)
    n = np.ceil(t * 1000).astype(int)
    betas = 1.0 - hand_alpha_bar(1000)[1:] / hand_alpha_bar(1000)[:-1]
    np.testing.assert_allclose(beta, -1000 * np.log1p(-betas[n - 1]), rtol=1e-9, err_msg=str(seed))


def test_network_time_and_training_times():
  discrete = diffusion.create_schedule(schedule_config("discrete"))
  vpsde = diffusion.create_schedule(schedule_config("vpsde"))
  t = jnp.array([0.001, 0.5, 1.0])
  np.testing.assert_allclose(discrete.network_time(t), [1.0, 500.0, 1000.0], rtol=1e-6)
  np.testing.assert_allclose(vpsde.network_time(t), [0.999, 499.5, 999.0], rtol=1e-6)
  assert discrete.network_time(t).dtype == jnp.float32

  n = np.asarray(discrete.network_time(discrete.sample_train_time(jax.random.key(0), 4096)))
  np.testing.assert_allclose(n, np.round(n), atol=1e-4)  # the paper's integer n in 1..N
  assert n.min() >= 1 and n.max() <= 1000 and len(np.unique(np.round(n))) > 900
  t = np.asarray(vpsde.sample_train_time(jax.random.key(1), 4096))
  assert 0.0 <= t.min() < 0.01 and 0.99 < t.max() < 1.0


def test_t_min_is_the_papers_sampling_end():
  assert diffusion.create_schedule(schedule_config("discrete")).t_min == 1e-3  # 1/N
  assert diffusion.create_schedule(schedule_config("discrete", 500)).t_min == 2e-3
  assert diffusion.create_schedule(schedule_config("vpsde")).t_min == 1e-3


def test_unknown_schedule_is_one_clear_error():
  with pytest.raises(ValueError, match=r"diffusion.schedule='cosine'.*discrete.*vpsde"):
    diffusion.create_schedule(schedule_config("cosine"))
