"""Samplers, chosen by name; each is one jittable loop over time-uniform steps from t = 1."""

import functools

import jax
import jax.numpy as jnp

from dim_jax.diffusion.guidance import guided_eps


def _ddim_step(schedule, x, eps, t, s, eta, rng):
  """DDIM (Song et al. 2021, eq. 12) from time t to s < t; eta = 0 is deterministic."""
  alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
  alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
  x0 = (x - sigma_t * eps) / alpha_t
  noise_scale = eta * (sigma_s / sigma_t) * jnp.sqrt(1.0 - (alpha_t / alpha_s) ** 2)
  direction = jnp.sqrt(jnp.maximum(sigma_s**2 - noise_scale**2, 0.0)) * eps
  return alpha_s * x0 + direction + noise_scale * jax.random.normal(rng, x.shape, x.dtype)


SAMPLERS = {"ddim": _ddim_step}


def validate(sampler: str, steps: int) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r}: use one of {sorted(SAMPLERS)}.")
  if steps <= 0:
    raise ValueError(f"sample.steps={steps}: must be a positive number of steps.")


def sample(
  denoise_fn,
  schedule,
  noise,
  labels,
  rng,
  *,
  sampler: str,
  steps: int,
  guidance_scale=1.0,
  null_label: int,
  eta: float = 0.0,
):
  """Integrates from x_1 = noise (B, H, W, C) down to t = schedule.t_min; returns x (B, H, W, C)."""
  validate(sampler, steps)
  times = jnp.linspace(1.0, schedule.t_min, steps + 1)
  eps_fn = functools.partial(
    guided_eps, denoise_fn, guidance_scale=guidance_scale, null_label=null_label
  )
  step_fn = SAMPLERS[sampler]

  def body(i, carry):
    x, rng = carry
    rng, step_rng = jax.random.split(rng)
    t, s = times[i], times[i + 1]
    t_net = jnp.full((x.shape[0],), schedule.network_time(t))
    eps = eps_fn(x, t_net, labels)
    return step_fn(schedule, x, eps, t, s, eta, step_rng), rng

  x, _ = jax.lax.fori_loop(0, steps, body, (noise.astype(jnp.float32), rng))
  return x
