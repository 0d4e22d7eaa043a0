"""The training objective: ε-prediction MSE (DDPM's L_simple) with label dropout for guidance."""

import jax
import jax.numpy as jnp


def training_loss(denoise_fn, schedule, x0, labels, rng, *, p_uncond: float, null_label: int):
  """L_simple = E ||ε - ε̂(α_t x0 + σ_t ε, t, y')||² (Ho et al. 2020, eq. 14).

  y' = y, or the null label with probability p_uncond.

  The times are the official code's (`train_ldm_discrete.py`, `sde.py`): n ~ U{1..N} for the
  discrete schedule, t ~ U(0, 1) for the VP-SDE; the network sees `schedule.network_time(t)`.
  Labels dropped to `null_label` train the unconditional model of classifier-free guidance
  (Ho & Salimans 2022). The loss is the mean over all elements (the official `mos`, then mean).

  denoise_fn(x_t (B, H, W, C), network time (B,) float32, labels (B,) int32) -> ε̂ (B, H, W, C).
  Returns (loss, metrics): metrics["uncond_fraction"] is the fraction of labels dropped.
  """
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  batch = x0.shape[0]
  x0 = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
  t = schedule.sample_train_time(t_rng, batch, x0.dtype)  # (B,)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)  # (B, H, W, C)
  expand = (slice(None),) + (None,) * (x0.ndim - 1)
  x_t = schedule.alpha(t)[expand] * x0 + schedule.sigma(t)[expand] * noise
  drop = jax.random.uniform(drop_rng, (batch,)) < p_uncond
  labels = jnp.where(drop, null_label, labels).astype(jnp.int32)
  pred = denoise_fn(x_t, schedule.network_time(t), labels)  # (B, H, W, C)
  loss = jnp.mean(jnp.square(pred.astype(x0.dtype) - noise))
  return loss, {"uncond_fraction": jnp.mean(drop.astype(jnp.float32))}
