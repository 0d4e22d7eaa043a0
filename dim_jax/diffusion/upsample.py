"""Upsample guidance (Hwang et al., arXiv 2404.01709): m x the trained side, no training.

A model trained at side S samples at side m·S; in the first part of the reverse trajectory a
low-resolution pass steers the coarse content of ε̂, as DiM does for 1024² and 1536² from its 512²
fine-tune (official `eval_ldm_discrete.py:sample_z` and `upsample_guidance.py:make_ufg_nnet`).
With D the m x m average pool and U the nearest-neighbour upsampling (D∘U = id):

  x_t = α_t x0 + σ_t ε      ->  D(x_t) = α_t D(x0) + (σ_t/m) ε',  ε' = m D(ε) ~ N(0, I),
  P   = α_t² + σ_t²/m²          (the pooled sample's power; `get_P` of the official code)
  x_lo = D(x_t) / √P        is a variance-preserving sample at the time τ where α_τ² = α_t²/P,
                            i.e. SNR(τ) = m² SNR(t) (the paper's time and power adjustments),
  ε_lo = ε̂(x_lo, τ)         estimates ε' = m D(ε), so ε_lo / m estimates D(ε), and
  ε̃    = ε̂(x_t, t) + η_t U(ε_lo / m - D(ε̂(x_t, t))),   η_t = η 𝟙[t >= 1 - θ].

With η_t = 1 the coarse part of ε̃ is the low-resolution model's, D(ε̃) = ε_lo / m, and the detail
(ε̂ - U D ε̂) is the high-resolution pass's. Both ε̂ are classifier-free guided (`guided_eps`), each in
one batched call of 2B; the official code uses η = 1, θ = 0.3 and w = 4 at both resolutions.

τ is the time, among the grid t_n = n/K (n = 1..K) and t itself, whose SNR is nearest m² SNR(t);
the official `get_tau` searches the N training steps and clamps τ <= t, which including t as a
candidate does too (a grid time after t has a lower SNR than t, so t is nearer). With m = 1 this
gives τ = t, P = 1 and ε̃ = ε̂.

Memory: besides the backbone's own passes, the guided step holds only image-sized arrays (x_lo,
ε_lo, D(ε̂), the correction: at 1536², 192² x 4 latents, about 0.6 MB per image each). The
low-resolution pass sits in a `lax.cond` that takes ε̂(x_t, t) as an operand, so it runs after the
high-resolution pass has finished and the two never hold activations at once: the peak is one
high-resolution backbone call of batch 2B, as without upsample guidance, and the 70 % of steps
outside the guided window skip the low-resolution pass altogether.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class UpsampleGuidance:
  """The config's `sample.upsample` block: m, η, θ and the τ grid (hashable, for jit)."""

  scale: int = 1  # m: sample at m x the trained side; 1 = off
  weight: float = 1.0  # η: 0 samples at m x without guidance (position tables resized only)
  active_fraction: float = 0.3  # θ: guided while t >= 1 - θ (t runs 1 -> 0)
  tau_grid: int = 0  # K: τ candidates t_n = n/K; 0 = the schedule's num_timesteps

  def __post_init__(self):
    if not isinstance(self.scale, int | np.integer) or self.scale < 1:
      raise ValueError(f"sample.upsample.scale={self.scale!r}: must be an integer >= 1 (1 = off).")
    if self.weight < 0.0:
      raise ValueError(f"sample.upsample.weight={self.weight!r}: must be >= 0 (1 as in DiM).")
    if not 0.0 <= self.active_fraction <= 1.0:
      raise ValueError(
        f"sample.upsample.active_fraction={self.active_fraction!r}: must be in [0, 1] (DiM: 0.3)."
      )
    if not isinstance(self.tau_grid, int | np.integer) or self.tau_grid < 0:
      raise ValueError(
        f"sample.upsample.tau_grid={self.tau_grid!r}: must be an integer >= 0 "
        "(0 = the schedule's num_timesteps)."
      )

  def grid_size(self, schedule) -> int:
    return self.tau_grid or schedule.num_timesteps


def avg_pool(x: jax.Array, m: int) -> jax.Array:
  """D: (B, H, W, C) -> (B, H/m, W/m, C), the mean of each m x m block."""
  b, h, w, c = x.shape
  return x.reshape(b, h // m, m, w // m, m, c).mean(axis=(2, 4))


def nearest_upsample(x: jax.Array, m: int) -> jax.Array:
  """U: (B, h, w, C) -> (B, h·m, w·m, C), each value copied to an m x m block."""
  return jnp.repeat(jnp.repeat(x, m, axis=1), m, axis=2)


def matched_time(schedule, t: jax.Array, m: int, grid_size: int) -> jax.Array:
  """τ (scalar): among t_n = n/K (n = 1..K) and t, the time whose SNR is nearest m² SNR(t)."""
  t = jnp.asarray(t)
  snr = lambda s: jnp.exp(2.0 * schedule.lambda_(s))  # α²/σ²
  grid = jnp.asarray(np.arange(1, grid_size + 1) / grid_size, t.dtype)
  candidates = jnp.append(grid, t)  # (K + 1,)
  return candidates[jnp.argmin(jnp.abs(snr(candidates) - m**2 * snr(t)))]


def lowres_input(schedule, x: jax.Array, t: jax.Array, m: int) -> jax.Array:
  """x_lo = D(x_t) / √P, P = α_t² + σ_t²/m²: (B, H, W, C) -> (B, H/m, W/m, C), unit variance."""
  power = 1.0 / m**2 + (1.0 - 1.0 / m**2) * schedule.alpha(t) ** 2  # σ² = 1 - α²; m = 1: P = 1
  return avg_pool(x, m) / jnp.sqrt(power).astype(x.dtype)


def upsample_guided_eps(eps_fn, schedule, x: jax.Array, t: jax.Array, guidance: UpsampleGuidance):
  """ε̃(x_t (B, H, W, C), scalar t) -> (B, H, W, C); eps_fn(x, t) is the CFG ε̂ at any size.

  H and W must be multiples of m. Two call sites of eps_fn: the high-resolution one always, the
  low-resolution one only inside the guided window.
  """
  m = guidance.scale
  if x.shape[1] % m or x.shape[2] % m:
    raise ValueError(
      f"sample.upsample.scale={m}: the sample size {x.shape[1]}x{x.shape[2]} is not a multiple "
      "of it."
    )
  eps = eps_fn(x, t)  # (B, H, W, C)
  if guidance.weight == 0.0:
    return eps

  def correction(x, eps):
    tau = matched_time(schedule, t, m, guidance.grid_size(schedule))
    eps_low = eps_fn(lowres_input(schedule, x, t, m), tau)  # (B, H/m, W/m, C)
    return nearest_upsample(eps_low.astype(eps.dtype) / m - avg_pool(eps, m), m)

  active = t >= 1.0 - guidance.active_fraction
  skip = lambda x, eps: jnp.zeros_like(eps)
  return eps + guidance.weight * jax.lax.cond(active, correction, skip, x, eps)
