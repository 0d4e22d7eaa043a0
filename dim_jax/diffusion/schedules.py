"""Noise schedules behind one interface: α_t, σ_t, λ_t, β(t) and the time the network sees.

Both are variance preserving, x_t = α_t x0 + σ_t ε with α_t² + σ_t² = 1, on t in [0, 1], in the
form of DPM-Solver's `NoiseScheduleVP` (Lu et al. 2022, §3 and App. D), which the official DiM
sampler uses (U-ViT's `dpm_solver_pp.py`):

  discrete  DDPM with N steps and Stable Diffusion's scaled-linear betas (§3.1),
            β_n = (√β_start + (n-1)/(N-1) (√β_end - √β_start))², ᾱ_n = Π_{k<=n} (1 - β_k).
            Step n sits at t_n = n/N and log α_t is piecewise linear in t between the steps, as in
            NoiseScheduleVP('discrete'); we add the step n = 0 (ᾱ_0 = 1, α = 1 at t = 0) so that
            [0, 1/N] is defined too (DPM-Solver extrapolates there instead; it never samples there).
            The network sees N·t, i.e. n at the steps: U-ViT / DiM train on n ~ U{1..N} and sample
            with `t_continuous * N` (`eval_ldm_discrete.py`).
  vpsde     the continuous VP-SDE of Song et al. (2021) with β(t) = β_min + t (β_max - β_min):
            log α_t = -(β_max - β_min) t²/4 - β_min t/2. Trained on t ~ U(0, 1) and the network sees
            999·t (U-ViT's `sde.py`: `sample(x0, t_init=0)`, `nnet(xt, t * 999)`; §3.3).

Every function takes t of any shape and computes in t's floating dtype (at least float32), so the
same schedule runs in float64 under `jax.experimental.enable_x64`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("discrete", "vpsde")


def _float(t) -> jax.Array:
  t = jnp.asarray(t)
  return t.astype(jnp.promote_types(t.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A VP schedule given by log α_t; σ_t, λ_t and β(t) follow from it."""

  kind: str  # "discrete" | "vpsde"
  num_timesteps: int
  beta_min: float = 0.1
  beta_max: float = 20.0
  log_alpha_knots: tuple = ()  # discrete: log α at t_n = n/N for n = 0..N, i.e. ½ log ᾱ_n

  @property
  def t_min(self) -> float:
    """DPM-Solver's end time ε: 1/N (discrete, as DiM samples) or 1e-3 (vpsde, as U-ViT does)."""
    return 1.0 / self.num_timesteps if self.kind == "discrete" else 1e-3

  def _segment(self, t: jax.Array):
    """Discrete: the step interval (m/N, (m+1)/N] holding t, and t's offset in it (in steps)."""
    u = t * self.num_timesteps
    m = jnp.clip(jnp.ceil(u) - 1, 0, self.num_timesteps - 1).astype(jnp.int32)
    knots = jnp.asarray(self.log_alpha_knots, t.dtype)
    return knots[m], knots[m + 1], u - m

  def log_alpha(self, t) -> jax.Array:
    t = _float(t)
    if self.kind == "vpsde":
      return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
    left, right, offset = self._segment(t)
    return left + offset * (right - left)

  def alpha(self, t) -> jax.Array:
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t) -> jax.Array:
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

  def lambda_(self, t) -> jax.Array:
    """λ_t = log α_t - log σ_t, the half log-SNR; strictly decreasing in t (+inf at t = 0)."""
    log_alpha = self.log_alpha(t)
    return log_alpha - 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))

  def beta(self, t) -> jax.Array:
    """β(t) = -2 d log α_t / dt, the forward SDE's dx = -½β x dt + √β dw (piecewise constant,
    -N log(1 - β_n) on step n's interval, for the discrete schedule)."""
    t = _float(t)
    if self.kind == "vpsde":
      return self.beta_min + t * (self.beta_max - self.beta_min)
    left, right, _ = self._segment(t)
    return -2.0 * self.num_timesteps * (right - left)

  def network_time(self, t) -> jax.Array:
    """The time the backbone sees, float32: N·t (discrete) or 999·t (vpsde)."""
    scale = self.num_timesteps if self.kind == "discrete" else 999.0
    return (_float(t) * scale).astype(jnp.float32)

  def sample_train_time(self, rng: jax.Array, batch: int, dtype=jnp.float32) -> jax.Array:
    """Training times (B,): t = n/N with n ~ U{1..N} (discrete), t ~ U(0, 1) (vpsde)."""
    if self.kind == "discrete":
      n = jax.random.randint(rng, (batch,), 1, self.num_timesteps + 1)
      return n.astype(dtype) / self.num_timesteps
    return jax.random.uniform(rng, (batch,), dtype)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Stable Diffusion's β_n = linspace(√β_start, √β_end, N)², n = 1..N, in float64."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def create_schedule(cfg) -> Schedule:
  """The schedule named by `cfg.schedule` (the config's `diffusion` block)."""
  if cfg.schedule == "discrete":
    if cfg.num_timesteps < 2:
      raise ValueError(f"diffusion.num_timesteps={cfg.num_timesteps}: must be at least 2.")
    betas = scaled_linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    log_alpha = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
    return Schedule("discrete", cfg.num_timesteps, log_alpha_knots=tuple(log_alpha.tolist()))
  if cfg.schedule == "vpsde":
    return Schedule("vpsde", cfg.num_timesteps, beta_min=cfg.beta_min, beta_max=cfg.beta_max)
  raise ValueError(f"diffusion.schedule={cfg.schedule!r}: use one of {list(SCHEDULES)}.")
