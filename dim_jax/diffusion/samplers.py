"""Samplers, chosen by name; each is one jittable `lax.fori_loop` with one backbone call site
(two under upsample guidance: one per resolution, `upsample.py`).

`steps` is the number of ε evaluations (NFE) for every sampler, so samplers compare at equal cost.
Each keeps its paper's time grid (as the official DiM / U-ViT samplers use them):

  ddpm              ancestral sampling (Ho et al. 2020, eq. 6-7: the posterior q(x_s | x_t, x̂0),
                    variance β̃) on t_i = 1 - i/steps, ending at t = 0 (x0); with the discrete
                    schedule and steps = N this is DDPM exactly, fewer steps respace it.
  ddim              DDIM (Song et al. 2021, eq. 12) on the same grid; eta = 0 deterministic,
                    eta = 1 is ddpm.
  dpm_solver_fast   DPM-Solver++ singlestep "fast" (Lu et al. 2022, DPM-Solver §3.3 and ++ §4),
                    the paper's FID setting: the NFE grid is time-uniform from T = 1 to
                    ε = schedule.t_min, cut into order-3 steps and a last order-1/2 step
                    (steps//3 + 1 steps; 50 NFE = 16 x 3 + 2); a step's intermediate times are the
                    grid points inside it; data prediction, "dpm_solver" (not Taylor) corrections.
  dpm_solver_pp_2m  DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep, time-uniform from 1 to ε.
  euler_maruyama    Euler-Maruyama on the reverse VP-SDE dx = [-½β x - β ∇log p_t] dt + √β dw̄
                    (Song et al. 2021), ∇log p_t = -ε/σ_t, as U-ViT's `sde.py` (DiM's CIFAR-10):
                    evaluations at linspace(ε, 1, steps) from the top, then a last noise-free step
                    from ε to 0.

DPM-Solver stops at ε, not 0, as the paper's sampler does (`eps=1/N`, §3.2): its output keeps
noise of std σ_ε (0.029 for the discrete schedule); DDIM and DDPM end at t = 0.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dim_jax.diffusion.guidance import guided_eps
from dim_jax.diffusion.upsample import UpsampleGuidance, upsample_guided_eps

SAMPLERS = ("ddpm", "ddim", "dpm_solver_fast", "dpm_solver_pp_2m", "euler_maruyama")


def validate(sampler: str, steps: int, eta: float = 0.0) -> None:
  """One clear error for a bad `sample` config block."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r}: use one of {list(SAMPLERS)}.")
  if not isinstance(steps, int | np.integer) or steps <= 0:
    raise ValueError(f"sample.steps={steps!r}: must be a positive integer (evaluations of ε).")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"sample.eta={eta!r}: must be in [0, 1] (0 deterministic, 1 DDPM).")
  if eta != 0.0 and sampler != "ddim":
    raise ValueError(f"sample.eta={eta!r} applies to sampler 'ddim' only; set it to 0.")


def sample(
  denoise_fn,
  schedule,
  noise,
  labels,
  rng,
  *,
  sampler: str,
  steps: int,
  guidance_scale: float = 1.0,
  null_label: int,
  eta: float = 0.0,
  upsample: UpsampleGuidance | None = None,
):
  """Integrates from x_1 = noise (B, H, W, C) at t = 1 to data; returns x (B, H, W, C).

  denoise_fn(x_t (B, H, W, C), network time (B,) float32, labels (B,) int32) -> ε̂ (B, H, W, C);
  labels (B,) int32 (the null label for an unconditional model). guidance_scale is w of
  classifier-free guidance (see `guided_eps`), a Python float. `upsample` adds upsample guidance
  (`upsample_guided_eps`) for noise at m x the trained side, CFG at both resolutions. The state is
  float32, or the noise's dtype if wider. Jittable (all keyword arguments are static).
  """
  validate(sampler, steps, eta)
  x = noise.astype(jnp.promote_types(noise.dtype, jnp.float32))
  labels = jnp.asarray(labels, jnp.int32)

  def cfg_eps(x, t):
    """ε̂(x (B, h, w, C) at any size, scalar time t) with classifier-free guidance."""
    t_net = jnp.broadcast_to(schedule.network_time(t), (x.shape[0],))
    return guided_eps(
      denoise_fn, x, t_net, labels, guidance_scale=guidance_scale, null_label=null_label
    )

  def eps_fn(x, t):
    """ε̂(x (B, H, W, C), scalar time t) with every guidance, in x's dtype."""
    if upsample is None:
      return cfg_eps(x, t).astype(x.dtype)
    return upsample_guided_eps(cfg_eps, schedule, x, t, upsample).astype(x.dtype)

  if sampler in ("ddpm", "ddim"):
    return ddim(eps_fn, schedule, x, rng, steps, eta=1.0 if sampler == "ddpm" else eta)
  if sampler == "dpm_solver_fast":
    return dpm_solver_fast(eps_fn, schedule, x, steps)
  if sampler == "dpm_solver_pp_2m":
    return dpm_solver_pp_2m(eps_fn, schedule, x, steps)
  return euler_maruyama(eps_fn, schedule, x, rng, steps)


def ddim(eps_fn, schedule, x, rng, steps: int, *, eta: float):
  """x_s = α_s x̂0 + √(σ_s² - σ̃²) ε̂ + σ̃ z, σ̃ = η (σ_s/σ_t) √(1 - α_t²/α_s²) (Song et al. eq. 12,
  16). With η = 1 this is DDPM's posterior q(x_s | x_t, x̂0): its mean α_s β_{t|s}/σ_t² x̂0 +
  α_{t|s} σ_s²/σ_t² x_t equals α_s x̂0 + √(σ_s² - σ̃²) ε̂ once x_t = α_t x̂0 + σ_t ε̂ is substituted."""
  times = jnp.asarray(np.linspace(1.0, 0.0, steps + 1), x.dtype)  # ends at t = 0: α = 1, σ = 0
  log_alpha = schedule.log_alpha(times)
  alpha, sigma = jnp.exp(log_alpha), schedule.sigma(times)

  def body(i, carry):
    x, rng = carry
    t, s = i, i + 1
    eps = eps_fn(x, times[t])
    x0 = (x - sigma[t] * eps) / alpha[t]
    x = alpha[s] * x0
    if eta == 0.0:
      return x + sigma[s] * eps, rng
    rng, step_rng = jax.random.split(rng)
    noise_std = (
      eta * sigma[s] / sigma[t] * jnp.sqrt(-jnp.expm1(2.0 * (log_alpha[t] - log_alpha[s])))
    )
    x = x + jnp.sqrt(jnp.maximum(sigma[s] ** 2 - noise_std**2, 0.0)) * eps
    return x + noise_std * jax.random.normal(step_rng, x.shape, x.dtype), rng

  x, _ = jax.lax.fori_loop(0, steps, body, (x, rng))
  return x


def _grid(schedule, times: np.ndarray, dtype):
  """Times (K,) as an array and α, σ, λ at them (t > 0)."""
  times = jnp.asarray(times, dtype)
  return times, schedule.alpha(times), schedule.sigma(times), schedule.lambda_(times)


def fast_orders(steps: int) -> list[int]:
  """DPM-Solver-fast's step orders for `steps` NFE (order 3): 3, ..., 3 then 2, 1 / 1 / 2."""
  k = steps // 3 + 1
  tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
  return [3] * (k - len(tail)) + tail


def dpm_solver_fast(eps_fn, schedule, x, steps: int):
  """DPM-Solver++ singlestep, orders 3/2/1, one ε evaluation per loop iteration.

  A step from s to t (h = λ_t - λ_s) evaluates x̂0 = D at s, s1, s2 (r_k = (λ_sk - λ_s)/h), with
  φ(r) = e^{-rh} - 1 (DPM-Solver++ eq. 9 and App. of DPM-Solver, data-prediction form):
    x_s1 = (σ_s1/σ_s) x_s - α_s1 φ(r1) D_s
    x_s2 = (σ_s2/σ_s) x_s - α_s2 φ(r2) D_s + (r2/r1) α_s2 (φ(r2)/(r2 h) + 1) (D_s1 - D_s)
    x_t  = (σ_t/σ_s) x_s - α_t φ(1) D_s + c (D_s1 - D_s) + c' (D_s2 - D_s),
  c = -α_t φ(1)/(2 r1) for order 2, c' = α_t (φ(1)/h + 1)/r2 for order 3 (else 0).
  """
  times, alpha, sigma, lam = _grid(schedule, np.linspace(1.0, schedule.t_min, steps + 1), x.dtype)
  orders = fast_orders(steps)
  # Per evaluation j: its step's start index on the grid, its stage in the step, the step's order.
  start = jnp.asarray(np.repeat(np.cumsum([0] + orders[:-1]), orders), jnp.int32)
  stage = jnp.asarray(np.concatenate([np.arange(k) for k in orders]), jnp.int32)
  order = jnp.asarray(np.repeat(orders, orders), jnp.int32)

  def body(j, carry):
    x_s, preds = carry  # x at the step's start (B, H, W, C); x̂0 at s, s1, s2 (3, B, H, W, C)
    s, k, n = start[j], stage[j], order[j]
    s1, s2, t, u = jnp.minimum(s + 1, steps), jnp.minimum(s + 2, steps), s + n, s + k
    h = lam[t] - lam[s]
    r1, r2 = (lam[s1] - lam[s]) / h, (lam[s2] - lam[s]) / h
    # The point of this evaluation: x_s, x_s1 or x_s2 (the D_s1 term only at stage 2).
    phi_u = jnp.expm1(-(lam[u] - lam[s]))
    c_u = jnp.where(k == 2, r2 / r1 * alpha[u] * (jnp.expm1(-r2 * h) / (r2 * h) + 1.0), 0.0)
    x_u = sigma[u] / sigma[s] * x_s - alpha[u] * phi_u * preds[0] + c_u * (preds[1] - preds[0])
    d = (x_u - sigma[u] * eps_fn(x_u, times[u])) / alpha[u]
    preds = jax.lax.dynamic_update_index_in_dim(preds, d, k, axis=0)
    # After the step's last evaluation, the update to t.
    phi_1 = jnp.expm1(-h)
    c_1 = jnp.where(n == 2, -0.5 / r1 * alpha[t] * phi_1, 0.0)
    c_2 = jnp.where(n == 3, alpha[t] * (phi_1 / h + 1.0) / r2, 0.0)
    x_t = (
      sigma[t] / sigma[s] * x_s
      - alpha[t] * phi_1 * preds[0]
      + c_1 * (preds[1] - preds[0])
      + c_2 * (preds[2] - preds[0])
    )
    return jnp.where(k == n - 1, x_t, x_s), preds

  preds = jnp.zeros((3, *x.shape), x.dtype)
  x, _ = jax.lax.fori_loop(0, steps, body, (x, preds))
  return x


def dpm_solver_pp_2m(eps_fn, schedule, x, steps: int):
  """DPM-Solver++(2M): x_{i+1} = (σ_{i+1}/σ_i) x_i - α_{i+1} (e^{-h} - 1) D_i with
  D_i = (1 + 1/(2r)) x̂0_i - 1/(2r) x̂0_{i-1}, r = h_{i-1}/h_i.

  The first and the last step are first order (D_i = x̂0_i): the official code's
  `lower_order_final`, here at every step count. On a time-uniform grid ending at ε the last step is
  by far the longest in λ, and extrapolating x̂0 across it costs more than it gains (with exact ε̂ on
  Gaussian data, 10 to 50 NFE, the last-step-first-order error is 2-15x smaller).
  """
  times, alpha, sigma, lam = _grid(schedule, np.linspace(1.0, schedule.t_min, steps + 1), x.dtype)

  def body(i, carry):
    x, d_prev = carry  # (B, H, W, C) each
    d = (x - sigma[i] * eps_fn(x, times[i])) / alpha[i]
    h = lam[i + 1] - lam[i]
    multistep = (i > 0) & (i < steps - 1)
    r = jnp.where(multistep, (lam[i] - lam[jnp.maximum(i - 1, 0)]) / h, 1.0)
    corrected = jnp.where(multistep, (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev, d)
    x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * jnp.expm1(-h) * corrected
    return x, d

  x, _ = jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))
  return x


def euler_maruyama(eps_fn, schedule, x, rng, steps: int):
  """x_s = x_t + [-½β(t) x_t + β(t) ε̂/σ_t](s - t) + √(β(t)(t - s)) z; z = 0 on the last step."""
  grid = np.append(np.linspace(schedule.t_min, 1.0, steps)[::-1], 0.0)
  times = jnp.asarray(grid, x.dtype)

  def body(i, carry):
    x, rng = carry
    rng, step_rng = jax.random.split(rng)
    t, s = times[i], times[i + 1]
    beta = schedule.beta(t)
    drift = -0.5 * beta * x + beta * eps_fn(x, t) / schedule.sigma(t)
    noise_std = jnp.where(i < steps - 1, jnp.sqrt(beta * (t - s)), 0.0)
    return x + drift * (s - t) + noise_std * jax.random.normal(step_rng, x.shape, x.dtype), rng

  x, _ = jax.lax.fori_loop(0, steps, body, (x, rng))
  return x
