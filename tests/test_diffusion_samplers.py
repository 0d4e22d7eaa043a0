"""Every sampler, fed the exact ε* of Gaussian data, against closed forms.

Data x0 ~ N(μ, Σ) in 2x2x2 "images" (d = 8, Σ non-diagonal). Then x_t ~ N(α_t μ, C_t) with
C_t = α_t² Σ + σ_t² I, and the exact noise prediction is ε*(x, t) = σ_t C_t⁻¹ (x - α_t μ), affine
in x. Every sampler step is then affine in its state plus Gaussian noise, so a sampler's output is
Gaussian and its law is computable without sampling. The samplers start from the exact x_1 ~
N(α_1 μ, C_1) (the input `noise` is any array), so an exact solver, ODE or SDE, ends at the data
marginal N(α_e μ, C_e) at its end time e (0, or ε for DPM-Solver): the "ideal law". Three laws:

  * The code's law. A deterministic sampler (DDIM η = 0, DPM-Solver fast, DPM-Solver++ 2M) is an
    affine map x_1 -> M x_1 + b; pushing 0 and the d basis vectors through `diffusion.sample` gives
    M and b exactly, so its output law N(M m_1 + b, M C_1 Mᵀ) carries no Monte-Carlo error at all.
  * The reference law. A float64 NumPy re-derivation of each algorithm from its paper (written
    here, independently of dim_jax), whose steps are affine maps A x + c plus noise of std ν: the
    law is propagated as m <- A m + c, C <- A C Aᵀ + ν² I.
  * The ideal law, N(α_e μ, α_e² Σ + σ_e² I).

Tests: code law == reference law (deterministic: to float64 rounding; stochastic: 20 000 samples,
within 5.5 Monte-Carlo standard deviations); the samples reproduce μ and Σ within Monte-Carlo
error plus the exact discretisation error; the discretisation error falls at the solver's rate;
and at 10 evaluations DPM-Solver is closer to the data than DDIM.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import diffusion
from tests.test_diffusion_schedules import hand_alpha_bar, schedule_config

SHAPE = (2, 2, 2)
D = 8
N_STEPS = 1000  # the discrete schedule's N
NET_SCALE = {"discrete": 1000.0, "vpsde": 999.0}
T_MIN = 1e-3  # DPM-Solver's ε for both schedules: 1/N and U-ViT's 1e-3


# ---------------------------------------------------------------- the problem


def gaussian_problem(seed: int):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(D, D))
  sigma = 0.5 * a @ a.T / D + 0.05 * np.eye(D)  # eigenvalues ~0.05..2, non-diagonal
  mu = rng.uniform(-0.5, 0.5, D)
  return mu, sigma


class NumpySchedule:
  """log α_t in float64 NumPy, from the closed forms (independent of dim_jax)."""

  def __init__(self, kind: str):
    self.kind = kind
    self.knots = 0.5 * np.log(hand_alpha_bar(N_STEPS))

  def log_alpha(self, t):
    if self.kind == "vpsde":
      return -0.25 * t**2 * 19.9 - 0.05 * t
    return np.interp(t, np.arange(N_STEPS + 1) / N_STEPS, self.knots)

  def alpha(self, t):
    return np.exp(self.log_alpha(t))

  def sigma(self, t):
    return np.sqrt(1.0 - np.exp(2 * self.log_alpha(t)))

  def lam(self, t):
    return np.log(self.alpha(t) / self.sigma(t))

  def beta(self, t):
    if self.kind == "vpsde":
      return 0.1 + 19.9 * t
    n = np.clip(np.ceil(t * N_STEPS - 1e-9), 1, N_STEPS).astype(int)  # t in ((n-1)/N, n/N]
    return -2 * N_STEPS * (self.knots[n] - self.knots[n - 1])


def jax_eps_star(schedule, kind, mu, sigma):
  """ε*(x, network time) for `diffusion.sample`; the time is read back from what the net sees."""

  def eps(x, t_net, labels):
    t = t_net[0].astype(x.dtype) / NET_SCALE[kind]
    a, s = schedule.alpha(t), schedule.sigma(t)
    cov = a**2 * sigma + s**2 * jnp.eye(D)
    flat = x.reshape(x.shape[0], D)
    return (s * jnp.linalg.solve(cov, (flat - a * mu).T).T).reshape(x.shape)

  return eps


def numpy_eps_star(ns: NumpySchedule, mu, sigma):
  def eps(x, t):  # x (n, d); the network sees float32(scale·t), as in the code
    scale = NET_SCALE[ns.kind]
    t = float(np.float32(t * scale)) / scale
    a, s = ns.alpha(t), ns.sigma(t)
    return s * np.linalg.solve(a**2 * sigma + s**2 * np.eye(D), (x - a * mu).T).T

  return eps


# ---------------------------------------------------------------- reference samplers (NumPy)
# Each returns a list of steps (f, ν): x <- f(x) + ν z, f affine on a batch x (n, d).


def ref_ddim(ns, eps, steps, eta):
  """Song et al. 2021, eq. 12 on t_i = 1 - i/steps, down to t = 0."""
  times = 1.0 - np.arange(steps + 1) / steps
  out = []
  for t, s in zip(times[:-1], times[1:], strict=True):
    a_t, s_t, a_s, s_s = ns.alpha(t), ns.sigma(t), ns.alpha(s), ns.sigma(s)
    nu = eta * s_s / s_t * np.sqrt(1 - a_t**2 / a_s**2)

    def f(x, t=t, a_t=a_t, s_t=s_t, a_s=a_s, s_s=s_s, nu=nu):
      e = eps(x, t)
      return a_s * (x - s_t * e) / a_t + np.sqrt(s_s**2 - nu**2) * e

    out.append((f, nu))
  return out


def ref_ddpm(ns, eps, steps):
  """Ho et al. 2020, eq. 6-7: x_s ~ q(x_s | x_t, x̂0) = N(μ̃, β̃ I) (posterior mean and variance)."""
  times = 1.0 - np.arange(steps + 1) / steps
  out = []
  for t, s in zip(times[:-1], times[1:], strict=True):
    a_t, a_s = ns.alpha(t), ns.alpha(s)
    abar_t, abar_s = a_t**2, a_s**2
    beta = 1 - abar_t / abar_s  # β_{t|s}
    var = (1 - abar_s) / (1 - abar_t) * beta  # β̃

    def f(x, t=t, a_t=a_t, a_s=a_s, abar_t=abar_t, abar_s=abar_s, beta=beta):
      x0 = (x - np.sqrt(1 - abar_t) * eps(x, t)) / a_t
      return a_s * beta / (1 - abar_t) * x0 + (a_t / a_s) * (1 - abar_s) / (1 - abar_t) * x

    out.append((f, np.sqrt(var)))
  return out


def ref_euler_maruyama(ns, eps, steps):
  """U-ViT's `euler_maruyama`: times [0, linspace(ε, 1, steps)] from the top; no noise into 0."""
  times = np.append(0.0, np.linspace(T_MIN, 1.0, steps))[::-1]
  out = []
  for t, s in zip(times[:-1], times[1:], strict=True):
    b = ns.beta(t)

    def f(x, t=t, s=s, b=b):
      drift = -0.5 * b * x - b * (-eps(x, t) / ns.sigma(t))  # f - g² ∇log p
      return x + drift * (s - t)

    out.append((f, np.sqrt(b * (t - s)) if s > 0 else 0.0))
  return out


def ref_dpm_solver_fast(ns, eps, steps):
  """DPM-Solver's `sample(method='fast', order=3, skip_type='time_uniform')` with predict_x0
  (U-ViT's dpm_solver_pp.py, as DiM evaluates): one step per order, intermediate times on the
  time-uniform NFE grid, DPM-Solver++ singlestep updates (Lu et al. 2022b, App. A)."""
  k = steps // 3 + 1
  orders = [3] * (k - 1) + [1] if steps % 3 == 1 else [3] * (k - 1) + [2]
  if steps % 3 == 0:
    orders = [3] * (k - 2) + [2, 1]
  grid = np.linspace(1.0, T_MIN, steps + 1)
  out, i = [], 0
  for order in orders:
    s, t = grid[i], grid[i + order]
    mids = grid[i + 1 : i + order]
    out.append((lambda x, s=s, t=t, mids=mids: _dpm_pp_single(ns, eps, x, s, t, mids), 0.0))
    i += order
  return out


def _dpm_pp_single(ns, eps, x, s, t, mids):
  def data(x, u):
    return (x - ns.sigma(u) * eps(x, u)) / ns.alpha(u)

  lam_s, h = ns.lam(s), ns.lam(t) - ns.lam(s)
  a_t, s_t, s_s = ns.alpha(t), ns.sigma(t), ns.sigma(s)
  d_s = data(x, s)
  x_t = s_t / s_s * x + a_t * (1 - np.exp(-h)) * d_s
  if len(mids) == 0:
    return x_t
  s1 = mids[0]
  r1 = (ns.lam(s1) - lam_s) / h
  x_s1 = ns.sigma(s1) / s_s * x + ns.alpha(s1) * (1 - np.exp(-r1 * h)) * d_s
  d_s1 = data(x_s1, s1)
  if len(mids) == 1:  # DPM-Solver++(2S): D = d_s + (d_s1 - d_s) / (2 r1)
    return x_t + a_t * (1 - np.exp(-h)) * (d_s1 - d_s) / (2 * r1)
  s2 = mids[1]
  r2 = (ns.lam(s2) - lam_s) / h
  phi = lambda r: (np.exp(-r * h) - 1) / (r * h) + 1
  x_s2 = (
    ns.sigma(s2) / s_s * x
    + ns.alpha(s2) * (1 - np.exp(-r2 * h)) * d_s
    + r2 / r1 * ns.alpha(s2) * phi(r2) * (d_s1 - d_s)
  )
  d_s2 = data(x_s2, s2)
  return x_t + a_t * phi(1.0) * (d_s2 - d_s) / r2


def ref_dpm_solver_pp_2m(ns, eps, x, steps):
  """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) with first-order first and last steps."""
  grid = np.linspace(1.0, T_MIN, steps + 1)
  d_prev = None
  for i in range(steps):
    s, t = grid[i], grid[i + 1]
    d = (x - ns.sigma(s) * eps(x, s)) / ns.alpha(s)
    h = ns.lam(t) - ns.lam(s)
    big_d = d
    if 0 < i < steps - 1:
      r = (ns.lam(s) - ns.lam(grid[i - 1])) / h
      big_d = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
    x = ns.sigma(t) / ns.sigma(s) * x + ns.alpha(t) * (1 - np.exp(-h)) * big_d
    d_prev = d
  return x


def law_of_steps(step_list, start):
  """(m, C) of the output for x_1 ~ N(start), propagated through affine steps with noise."""
  m, cov = start
  basis = np.concatenate([np.zeros((1, D)), np.eye(D)])
  for f, nu in step_list:
    out = f(basis)
    c, a = out[0], (out[1:] - out[0]).T
    m, cov = a @ m + c, a @ cov @ a.T + nu**2 * np.eye(D)
  return m, cov


def prior(kind, mu, sigma):
  """The exact law of x_1: N(α_1 μ, C_1), the samplers' input here."""
  ns = NumpySchedule(kind)
  a, s = ns.alpha(1.0), ns.sigma(1.0)
  return a * mu, a**2 * sigma + s**2 * np.eye(D)


def affine_law(out, start):
  """The law of f(x_1), x_1 ~ N(start), from out = f([0, e_1, ..., e_d]) of an affine f."""
  b, a = out[0], (out[1:] - out[0]).T
  return a @ start[0] + b, a @ start[1] @ a.T


def reference_law(kind, sampler, steps, mu, sigma, eta=0.0):
  ns = NumpySchedule(kind)
  eps = numpy_eps_star(ns, mu, sigma)
  start = prior(kind, mu, sigma)
  if sampler == "dpm_solver_pp_2m":
    out = ref_dpm_solver_pp_2m(ns, eps, np.concatenate([np.zeros((1, D)), np.eye(D)]), steps)
    return affine_law(out, start)
  step_list = {
    "ddim": lambda: ref_ddim(ns, eps, steps, eta),
    "ddpm": lambda: ref_ddpm(ns, eps, steps),
    "euler_maruyama": lambda: ref_euler_maruyama(ns, eps, steps),
    "dpm_solver_fast": lambda: ref_dpm_solver_fast(ns, eps, steps),
  }[sampler]()
  return law_of_steps(step_list, start)


def ideal_law(kind, sampler, mu, sigma):
  """The data marginal at the sampler's end time: DPM-Solver stops at ε, the others at 0."""
  ns = NumpySchedule(kind)
  t_end = T_MIN if sampler.startswith("dpm_solver") else 0.0
  a, s = ns.alpha(t_end), ns.sigma(t_end)
  return a * mu, a**2 * sigma + s**2 * np.eye(D)


def law_error(law, target):
  """The largest deviation of any mean or covariance entry."""
  return max(np.abs(law[0] - target[0]).max(), np.abs(law[1] - target[1]).max())


# ---------------------------------------------------------------- the code under test


def run_sampler(kind, sampler, steps, mu, sigma, x1, seed=0, eta=0.0):
  schedule = diffusion.create_schedule(schedule_config(kind))
  out = diffusion.sample(
    jax_eps_star(schedule, kind, mu, sigma),
    schedule,
    jnp.asarray(x1.reshape(-1, *SHAPE)),
    jnp.zeros(x1.shape[0], jnp.int32),
    jax.random.key(seed),
    sampler=sampler,
    steps=steps,
    null_label=0,
    eta=eta,
  )
  assert out.dtype == jnp.float64 and out.shape == (x1.shape[0], *SHAPE)
  return np.asarray(out).reshape(x1.shape[0], D)


def code_law(kind, sampler, steps, mu, sigma):
  """The exact output law of a deterministic (affine) sampler: 0 and the basis pushed through."""
  out = run_sampler(kind, sampler, steps, mu, sigma, np.concatenate([np.zeros((1, D)), np.eye(D)]))
  return affine_law(out, prior(kind, mu, sigma))


@pytest.fixture
def problem():
  seed = int(np.random.SeedSequence().entropy % 2**31)
  with jax.enable_x64(True):
    yield seed, *gaussian_problem(seed)


# ---------------------------------------------------------------- tests

# The time-uniform grids end at ε (or 0) where λ_t ~ -½ log t, so the last steps stay long in λ
# and the asymptotic orders (1, 3, 2) show only partly at these step counts: the error falls by
# 3.1-3.9x (DDIM), 5.3-68x (fast) and 5.3-22x (2M) per 4x steps over 10 -> 40 -> 160 (measured on
# both schedules, 40 random problems). Required: better than 2.5x for DDIM (no floor) and better
# than first order (4x) for DPM-Solver; a wrong coefficient leaves a floor or drops the order.
CONVERGENCE = {"ddim": 2.5, "dpm_solver_fast": 4.0, "dpm_solver_pp_2m": 4.0}


@pytest.mark.parametrize("kind", ["discrete", "vpsde"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_fast", "dpm_solver_pp_2m"])
def test_deterministic_sampler_is_exact(problem, kind, sampler):
  seed, mu, sigma = problem
  ideal = ideal_law(kind, sampler, mu, sigma)
  errors = []
  for steps in (10, 40, 160):
    code = code_law(kind, sampler, steps, mu, sigma)
    reference = reference_law(kind, sampler, steps, mu, sigma)
    # The algorithm, step for step: only float64 rounding apart (measured ~3e-15).
    assert law_error(code, reference) < 1e-10, f"seed {seed}, {steps} steps"
    errors.append(law_error(code, ideal))
  assert errors[1] < errors[0] / CONVERGENCE[sampler], f"seed {seed}: {errors}"
  assert errors[2] < errors[1] / CONVERGENCE[sampler], f"seed {seed}: {errors}"
  # 160 evaluations reproduce μ and Σ: within 4 % of Σ's scale (measured ≤ 2.1 % over 40 draws).
  assert errors[2] < 0.04 * np.linalg.eigvalsh(sigma).max(), f"seed {seed}: {errors}"


@pytest.mark.parametrize("kind", ["discrete", "vpsde"])
def test_dpm_solver_beats_ddim_at_equal_evaluations(problem, kind):
  """At 10 evaluations. Measured over 80 random problems on both schedules: DDIM's error is
  0.17-0.48, DPM-Solver's (fast or 2M) 0.16-0.45 times DDIM's."""
  seed, mu, sigma = problem
  err = {
    sampler: law_error(code_law(kind, sampler, 10, mu, sigma), ideal_law(kind, sampler, mu, sigma))
    for sampler in ("ddim", "dpm_solver_fast", "dpm_solver_pp_2m")
  }
  assert err["dpm_solver_fast"] < 0.7 * err["ddim"], f"seed {seed}: {err}"
  assert err["dpm_solver_pp_2m"] < 0.7 * err["ddim"], f"seed {seed}: {err}"


@pytest.mark.parametrize(
  "kind, sampler, eta, steps",
  [
    ("discrete", "ddpm", 0.0, 100),
    ("vpsde", "ddim", 0.5, 100),
    ("vpsde", "euler_maruyama", 0.0, 200),
    ("discrete", "euler_maruyama", 0.0, 100),
  ],
)
def test_stochastic_sampler_reproduces_the_data(problem, kind, sampler, eta, steps):
  """20 000 samples against the algorithm's exact law and against the data.

  The sample mean and covariance of n Gaussian draws from N(m, C) have standard deviations
  √(C_ii/n) and √((C_ii C_jj + C_ij²)/n); over the 8 + 36 statistics, 5.5 of them are exceeded
  with probability ~2e-6. The distance from the algorithm's law to the data is the discretisation
  error, computed exactly (no sampling) and checked to fall like 1/steps.
  """
  seed, mu, sigma = problem
  n = 20_000
  start = prior(kind, mu, sigma)
  x1 = np.random.default_rng(seed).multivariate_normal(start[0], start[1], n)
  x = run_sampler(kind, sampler, steps, mu, sigma, x1, seed=seed, eta=eta)
  mean, cov = x.mean(0), np.cov(x.T)

  reference = reference_law(kind, sampler, steps, mu, sigma, eta)
  ideal = ideal_law(kind, sampler, mu, sigma)
  var = np.diag(reference[1])
  mean_std = np.sqrt(var / n)
  cov_std = np.sqrt((np.outer(var, var) + reference[1] ** 2) / n)
  assert np.all(np.abs(mean - reference[0]) < 5.5 * mean_std), f"seed {seed}"
  assert np.all(np.abs(cov - reference[1]) < 5.5 * cov_std), f"seed {seed}"
  # μ and Σ, within Monte-Carlo error plus the exact discretisation error.
  discretisation = law_error(reference, ideal)
  assert np.all(np.abs(mean - ideal[0]) < 5.5 * mean_std + discretisation), f"seed {seed}"
  assert np.all(np.abs(cov - ideal[1]) < 5.5 * cov_std + discretisation), f"seed {seed}"
  # First order: 4x the steps, ~4x smaller (measured 3.1-19x over 40 draws); a floor fails this.
  # At these step counts the error is within 15 % of Σ's scale (measured ≤ 7 %).
  finer = law_error(reference_law(kind, sampler, 4 * steps, mu, sigma, eta), ideal)
  assert finer < discretisation / 2.5, f"seed {seed}: {discretisation} -> {finer}"
  assert discretisation < 0.15 * np.linalg.eigvalsh(sigma).max(), f"seed {seed}"


# ---------------------------------------------------------------- interface


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_one_backbone_call_site_per_sampler(sampler, scale):
  """The loop body is traced once: the backbone appears once in the program (batch 2B with
  guidance), whatever the number of steps, so a big model compiles once."""
  batches = []

  def backbone(x, t_net, y):
    batches.append(x.shape[0])
    return x * 0.1

  schedule = diffusion.create_schedule(schedule_config("discrete"))
  run = lambda noise: diffusion.sample(
    backbone,
    schedule,
    noise,
    jnp.zeros(3, jnp.int32),
    jax.random.key(0),
    sampler=sampler,
    steps=7,
    guidance_scale=scale,
    null_label=1,
  )
  jax.jit(run).lower(jnp.zeros((3, *SHAPE)))
  assert batches == [3 if scale == 1.0 else 6]


def test_bad_sampler_config_is_one_clear_error():
  schedule = diffusion.create_schedule(schedule_config("vpsde"))
  kwargs = dict(null_label=0, labels=jnp.zeros(1, jnp.int32), rng=jax.random.key(0))
  cases = [
    (dict(sampler="heun", steps=10), r"sample.sampler='heun'.*ddpm.*euler_maruyama"),
    (dict(sampler="ddim", steps=0), r"sample.steps=0.*positive integer"),
    (dict(sampler="ddim", steps=10, eta=1.5), r"sample.eta=1.5.*\[0, 1\]"),
    (dict(sampler="dpm_solver_fast", steps=10, eta=0.5), r"sample.eta=0.5 applies to .*ddim"),
  ]
  for options, message in cases:
    with pytest.raises(ValueError, match=message):
      diffusion.sample(lambda x, t, y: x, schedule, jnp.zeros((1, *SHAPE)), **kwargs, **options)


SHARDED_RUN = """
import jax, jax.numpy as jnp, numpy as np, ml_collections
from dim_jax import diffusion, parallel
cfg = ml_collections.ConfigDict(dict(schedule="discrete", num_timesteps=1000, beta_start=0.00085,
                                     beta_end=0.012, beta_min=0.1, beta_max=20.0))
schedule = diffusion.create_schedule(cfg)
mesh = parallel.create_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))  # as training does
batch = parallel.batch_sharding(mesh)
w = jnp.asarray(np.random.default_rng(0).normal(size=(11, 2, 2, 2)), jnp.float32)
backbone = lambda x, t, y: jnp.tanh(x * w[y] + t[:, None, None, None] / 1000)
noise = jax.random.normal(jax.random.key(1), (16, 2, 2, 2))
labels = jnp.arange(16, dtype=jnp.int32) % 10
for sampler in diffusion.SAMPLERS:
  run = jax.jit(lambda n, y: diffusion.sample(backbone, schedule, n, y, jax.random.key(2),
                sampler=sampler, steps=6, guidance_scale=1.5, null_label=10))
  one = run(noise, labels)
  eight = run(jax.device_put(noise, batch), jax.device_put(labels, batch))
  assert eight.sharding.is_equivalent_to(batch, 4), (sampler, eight.sharding)
  np.testing.assert_allclose(np.asarray(eight), np.asarray(one), atol=1e-5, err_msg=sampler)
print("ok")
"""


def test_samplers_shard_over_the_batch():
  """On 8 fake devices, a batch-sharded input stays batch-sharded through each sampler (with
  guidance) and gives the single-device result."""
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
    [sys.executable, "-c", SHARDED_RUN], env=env, cwd=repo, capture_output=True, text=True
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
