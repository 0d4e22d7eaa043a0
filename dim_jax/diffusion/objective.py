"""The training objective: ε-prediction MSE (DDPM's L_simple) with label dropout for guidance."""

import jax
import jax.numpy as jnp


def training_loss(denoise_fn, schedule, x0, labels, rng, *, p_uncond: float, null_label: int):
  """E ||ε - ε̂(α_t x0 + σ_t ε, t, y')||², y' = null with probability p_uncond.

  denoise_fn(x_t (B, H, W, C), network time (B,), labels (B,)) -> ε̂ (B, H, W, C).
  Returns (mean loss, metrics dict).
  """
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  batch = x0.shape[0]
  t = schedule.sample_train_time(t_rng, batch)  # (B,)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  expand = (slice(None),) + (None,) * (x0.ndim - 1)
  x_t = schedule.alpha(t)[expand] * x0 + schedule.sigma(t)[expand] * noise
  drop = jax.random.uniform(drop_rng, (batch,)) < p_uncond
  labels = jnp.where(drop, null_label, labels)
  pred = denoise_fn(x_t, schedule.network_time(t), labels)
  loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise))
  return loss, {}
