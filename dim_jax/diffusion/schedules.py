"""Noise schedules behind one interface: α_t, σ_t, λ_t and the time the network sees, t in (0, 1].

Both are variance preserving (α_t² + σ_t² = 1), in DPM-Solver's NoiseScheduleVP form:

  discrete  DDPM with N steps and Stable Diffusion's scaled-linear betas,
            β_n = (√β_start + (n-1)/(N-1) (√β_end - √β_start))², ᾱ_n = Π_{k<=n} (1 - β_k);
            step n is t = n/N, log α_t is piecewise linear in t between the steps, and the
            network sees t·N (= n at the steps), as U-ViT / DiM's ImageNet code does.
  vpsde     continuous VP-SDE (Song et al.) with linear β(t) in [β_min, β_max]:
            log α_t = -(β_max - β_min) t² / 4 - β_min t / 2; the network sees 999·t (DiM's CIFAR).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A VP schedule: `log_alpha(t)`; everything else follows from it."""

  kind: str
  num_timesteps: int
  beta_min: float = 0.1
  beta_max: float = 20.0
  log_alpha_steps: tuple = ()  # discrete: 0.5 log ᾱ_n for n = 1..N

  @property
  def t_min(self) -> float:
    """The smallest time samplers go down to."""
    return 1.0 / self.num_timesteps if self.kind == "discrete" else 1e-3

  def log_alpha(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "vpsde":
      return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
    grid = jnp.arange(1, self.num_timesteps + 1, dtype=jnp.float32) / self.num_timesteps
    values = jnp.asarray(self.log_alpha_steps, jnp.float32)
    # Piecewise linear, extended linearly below t = 1/N (DPM-Solver's interpolation).
    slope = (values[1] - values[0]) / (grid[1] - grid[0])
    inside = jnp.interp(t, grid, values)
    return jnp.where(t < grid[0], values[0] + slope * (t - grid[0]), inside)

  def alpha(self, t):
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

  def lambda_(self, t):
    """Half log-SNR: log α_t - log σ_t (decreasing in t)."""
    log_alpha = self.log_alpha(t)
    return log_alpha - 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))

  def network_time(self, t):
    scale = self.num_timesteps if self.kind == "discrete" else 999.0
    return jnp.asarray(t, jnp.float32) * scale

  def sample_train_time(self, rng: jax.Array, batch: int) -> jax.Array:
    """Training times: n ~ U{1..N} as t = n/N (discrete), t ~ U(0, 1) (vpsde)."""
    if self.kind == "discrete":
      n = jax.random.randint(rng, (batch,), 1, self.num_timesteps + 1)
      return n.astype(jnp.float32) / self.num_timesteps
    return jax.random.uniform(rng, (batch,), jnp.float32)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def create_schedule(cfg) -> Schedule:
  if cfg.schedule == "discrete":
    betas = scaled_linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    log_alpha = 0.5 * np.cumsum(np.log1p(-betas))
    return Schedule("discrete", cfg.num_timesteps, log_alpha_steps=tuple(log_alpha.tolist()))
  if cfg.schedule == "vpsde":
    return Schedule("vpsde", cfg.num_timesteps, beta_min=cfg.beta_min, beta_max=cfg.beta_max)
  raise ValueError(f"diffusion.schedule={cfg.schedule!r}: use 'discrete' or 'vpsde'.")
