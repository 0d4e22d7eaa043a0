"""Diffusion: schedules, the training objective, samplers and guidance.

  schedule = diffusion.create_schedule(config.diffusion)
  loss, metrics = diffusion.training_loss(denoise_fn, schedule, x0, labels, rng,
                                          p_uncond=..., null_label=...)
  x = diffusion.sample(denoise_fn, schedule, noise, labels, rng, sampler="dpm_solver_fast",
                       steps=50, guidance_scale=1.4, null_label=..., eta=0.0,
                       upsample=diffusion.UpsampleGuidance(scale=2))  # optional: noise at 2x side

denoise_fn(x_t (B, H, W, C), network time (B,) float32, labels (B,) int32) -> ε̂ (B, H, W, C).
"""

from dim_jax.diffusion.guidance import guided_eps
from dim_jax.diffusion.objective import training_loss
from dim_jax.diffusion.samplers import SAMPLERS, sample, validate
from dim_jax.diffusion.schedules import SCHEDULES, Schedule, create_schedule
from dim_jax.diffusion.upsample import UpsampleGuidance, upsample_guided_eps

__all__ = [
  "SAMPLERS",
  "SCHEDULES",
  "Schedule",
  "UpsampleGuidance",
  "create_schedule",
  "guided_eps",
  "sample",
  "training_loss",
  "upsample_guided_eps",
  "validate",
]
