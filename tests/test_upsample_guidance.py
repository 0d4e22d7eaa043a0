"""Upsample guidance against float64 NumPy references written here: the guided ε by hand (block
means, the power P, nearest upsampling by np.kron, CFG at both resolutions), the τ search by brute
force, a whole DDIM run; weight 0 and m = 1 change nothing; a trained demo samples at twice its
side."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import diffusion
from tests.test_diffusion_schedules import hand_alpha_bar, schedule_config

NULL = 5
N_STEPS = 1000
CHANNELS = 3


@pytest.fixture
def seed():
  return int(np.random.SeedSequence().entropy % 2**31)


def toy_backbone(seed: int):
  """ε̂(x, t_net, y) = tanh(x·W[y] + t_net/1000): JAX, its NumPy twin, and the batch shapes seen."""
  weights = np.random.default_rng(seed).normal(size=(NULL + 1, CHANNELS))
  shapes = []

  def jax_fn(x, t_net, y):
    shapes.append(x.shape)
    w = jnp.asarray(weights, x.dtype)[y][:, None, None, :]
    return jnp.tanh(x * w + t_net[:, None, None, None] / 1000)

  def numpy_fn(x, t_net, y):
    return np.tanh(x * weights[y][:, None, None, :] + t_net / 1000)

  return jax_fn, numpy_fn, shapes


# ---------------------------------------------------------------- NumPy references


def hand_log_alpha(kind: str, t):
  """log α_t: ½ log ᾱ interpolated between the steps n/N (discrete), or the VP-SDE closed form."""
  if kind == "vpsde":
    return -0.25 * t**2 * 19.9 - 0.05 * t
  return np.interp(t, np.arange(N_STEPS + 1) / N_STEPS, 0.5 * np.log(hand_alpha_bar(N_STEPS)))


def hand_snr(kind: str, t):
  alpha_sq = np.exp(2 * hand_log_alpha(kind, np.asarray(t, np.float64)))
  return alpha_sq / (1 - alpha_sq)


def brute_force_tau(kind: str, t: float, m: int, grid_size: int) -> float:
  """The candidate in {n/K} ∪ {t} with the SNR nearest m² SNR(t), one at a time."""
  target = m**2 * hand_snr(kind, t)
  candidates = [n / grid_size for n in range(1, grid_size + 1)] + [t]
  distances = [abs(hand_snr(kind, c) - target) for c in candidates]
  return candidates[int(np.argmin(distances))]


def block_mean(x, m):
  """(B, H, W, C) -> (B, H/m, W/m, C), one block at a time."""
  b, h, w, c = x.shape
  out = np.zeros((b, h // m, w // m, c))
  for i in range(h // m):
    for j in range(w // m):
      out[:, i, j] = x[:, i * m : (i + 1) * m, j * m : (j + 1) * m].mean(axis=(1, 2))
  return out


def nearest(x, m):
  return np.kron(x, np.ones((1, m, m, 1)))


def hand_guided_eps(numpy_fn, x, t, labels, *, m, weight, theta, w_cfg, kind="discrete"):
  """ε̃ = ε̂(x_t, t) + η_t U(ε̂(D(x_t)/√P, τ)/m - D(ε̂(x_t, t))), CFG ε_u + w(ε_c - ε_u) at both."""

  def cfg(x, t):
    t_net = np.float32(N_STEPS * t)  # the network sees N·t in float32
    eps_c = numpy_fn(x, t_net, labels)
    eps_u = numpy_fn(x, t_net, np.full_like(labels, NULL))
    return eps_u + w_cfg * (eps_c - eps_u)

  eps = cfg(x, t)
  if weight == 0 or t < 1 - theta:
    return eps
  alpha_sq = np.exp(2 * hand_log_alpha(kind, t))
  power = alpha_sq + (1 - alpha_sq) / m**2
  tau = brute_force_tau(kind, t, m, N_STEPS)
  eps_low = cfg(block_mean(x, m) / np.sqrt(power), tau)
  return eps + weight * nearest(eps_low / m - block_mean(eps, m), m)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["discrete", "vpsde"])
@pytest.mark.parametrize("m, grid_size", [(1, 0), (2, 0), (3, 0), (2, 37)])
def test_tau_has_the_nearest_snr_to_m_squared_snr(kind, m, grid_size, seed):
  rng = np.random.default_rng(seed)
  times = np.concatenate([rng.uniform(1e-3, 1.0, 24), [1.0, 0.7, 0.25, 0.5005]])
  guidance = diffusion.UpsampleGuidance(scale=m, tau_grid=grid_size)
  with jax.enable_x64(True):
    schedule = diffusion.create_schedule(schedule_config(kind))
    k = guidance.grid_size(schedule)
    got = [float(diffusion.upsample.matched_time(schedule, t, m, k)) for t in times]
  want = [brute_force_tau(kind, t, m, k) for t in times]
  np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"seed {seed}")
  assert all(tau <= t for tau, t in zip(got, times, strict=True))
  if m == 1:
    np.testing.assert_array_equal(got, times)  # t itself: its own SNR


@pytest.mark.parametrize("m", [2, 3])
def test_guided_eps_matches_the_hand_computation(m, seed):
  """One call of batch 2B per resolution; the result equals the float64 NumPy formula."""
  rng = np.random.default_rng(seed)
  batch, side = 4, 6  # a multiple of m = 2 and 3
  x = rng.normal(size=(batch, side, side, CHANNELS))
  labels = rng.integers(0, NULL, batch).astype(np.int32)
  t = float(rng.uniform(0.7, 1.0))
  jax_fn, numpy_fn, shapes = toy_backbone(seed)
  guidance = diffusion.UpsampleGuidance(scale=m, weight=float(rng.uniform(0.5, 2.0)))
  with jax.enable_x64(True):
    schedule = diffusion.create_schedule(schedule_config("discrete"))

    def cfg_eps(x, t):
      t_net = jnp.broadcast_to(schedule.network_time(t), (x.shape[0],))
      return diffusion.guided_eps(jax_fn, x, t_net, labels, guidance_scale=4.0, null_label=NULL)

    got = diffusion.upsample_guided_eps(cfg_eps, schedule, jnp.asarray(x), jnp.asarray(t), guidance)
  low = side // m
  assert shapes == [(2 * batch, side, side, CHANNELS), (2 * batch, low, low, CHANNELS)], shapes
  want = hand_guided_eps(numpy_fn, x, t, labels, m=m, weight=guidance.weight, theta=0.3, w_cfg=4.0)
  np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"seed {seed}")
  plain = hand_guided_eps(numpy_fn, x, t, labels, m=m, weight=0.0, theta=0.3, w_cfg=4.0)
  assert np.abs(want - plain).max() > 1e-3  # the guidance term is not vanishing here


def test_scale_one_is_the_unguided_eps(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 4, 4, CHANNELS)).astype(np.float32)
  labels = rng.integers(0, NULL, 3).astype(np.int32)
  jax_fn, numpy_fn, _ = toy_backbone(seed)
  schedule = diffusion.create_schedule(schedule_config("discrete"))
  guidance = diffusion.UpsampleGuidance(scale=1, weight=1.7, active_fraction=1.0)

  def cfg_eps(x, t):
    t_net = jnp.broadcast_to(schedule.network_time(t), (x.shape[0],))
    return diffusion.guided_eps(jax_fn, x, t_net, labels, guidance_scale=2.5, null_label=NULL)

  for t in rng.uniform(1e-3, 1.0, 4).astype(np.float32):
    got = diffusion.upsample_guided_eps(cfg_eps, schedule, x, jnp.asarray(t), guidance)
    # float32: the two ε̂(x, t) of the correction are evaluated in separate programs (≤ 1.7e-6
    # apart in 1200 draws); a τ one step of 1/N away shifts the toy ε̂ by up to 1e-3.
    np.testing.assert_allclose(got, cfg_eps(x, jnp.asarray(t)), atol=1e-5, err_msg=str(seed))


def hand_ddim(numpy_fn, noise, labels, steps, **guidance):
  """DDIM η = 0 on t_i = 1 - i/steps (Song et al. eq. 12) over the hand-guided ε, float64."""
  times = np.linspace(1.0, 0.0, steps + 1)
  alpha = np.exp(hand_log_alpha("discrete", times))
  sigma = np.sqrt(1 - alpha**2)
  x = noise.astype(np.float64)
  for i in range(steps):
    eps = hand_guided_eps(numpy_fn, x, times[i], labels, **guidance)
    x0 = (x - sigma[i] * eps) / alpha[i]
    x = alpha[i + 1] * x0 + sigma[i + 1] * eps
  return x


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_sampler_runs_the_guided_eps_in_its_window(weight, seed):
  """A jitted DDIM run at 2x with upsample guidance equals a NumPy DDIM over the hand formula, the
  window t >= 1 - θ included; weight 0 equals plain sampling at the larger size."""
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(2, 4, 4, CHANNELS)).astype(np.float32)
  labels = rng.integers(0, NULL, 2).astype(np.int32)
  jax_fn, numpy_fn, _ = toy_backbone(seed)
  schedule = diffusion.create_schedule(schedule_config("discrete"))
  options = dict(sampler="ddim", steps=10, guidance_scale=1.5, null_label=NULL)
  upsample = diffusion.UpsampleGuidance(scale=2, weight=weight, active_fraction=0.35)
  run = lambda up: jax.jit(
    lambda n: diffusion.sample(
      jax_fn, schedule, n, labels, jax.random.key(0), **options, upsample=up
    )
  )(noise)
  got = run(upsample)
  want = hand_ddim(numpy_fn, noise, labels, 10, m=2, weight=weight, theta=0.35, w_cfg=1.5)
  np.testing.assert_allclose(got, want, atol=5e-5, err_msg=f"seed {seed}")
  if weight == 0.0:
    np.testing.assert_array_equal(got, run(None))


def test_bad_upsample_config_is_one_clear_error():
  cases = [
    (dict(scale=0), r"sample.upsample.scale=0.*integer >= 1"),
    (dict(scale=1.5), r"sample.upsample.scale=1.5"),
    (dict(weight=-1.0), r"sample.upsample.weight=-1.0"),
    (dict(active_fraction=1.2), r"sample.upsample.active_fraction=1.2.*\[0, 1\]"),
    (dict(tau_grid=-3), r"sample.upsample.tau_grid=-3"),
  ]
  for options, message in cases:
    with pytest.raises(ValueError, match=message):
      diffusion.UpsampleGuidance(**options)
  schedule = diffusion.create_schedule(schedule_config("discrete"))
  with pytest.raises(ValueError, match=r"scale=2: the sample size 5x6"):
    diffusion.upsample_guided_eps(
      lambda x, t: x, schedule, jnp.zeros((1, 5, 6, 3)), 1.0, diffusion.UpsampleGuidance(scale=2)
    )


def test_demo_checkpoint_samples_at_twice_its_size(tmp_path):
  """A demo model trained 2 steps, then --mode=sample with sample.upsample.scale=2: 16² -> 32²."""
  from PIL import Image

  from dim_jax import sample, train
  from tests.test_train import tiny_config

  config = tiny_config(num_steps=2)
  config.sample.num_images = 0
  train.train_and_evaluate(config, str(tmp_path))
  config.sample.update(num_images=4, batch_size=4, steps=3)
  config.sample.upsample.scale = 2
  path = sample.sample_from_workdir(config, str(tmp_path))
  assert path.endswith("_upsample2x.png"), path
  side = 2 * config.model.input_size
  # A 2 x 2 grid with 2-pixel gaps.
  assert np.asarray(Image.open(path)).shape == (2 * side + 2, 2 * side + 2, 3)
  images = np.load(path[: -len(".png")] + ".npz")["images"]
  assert images.shape == (4, side, side, 3) and images.dtype == np.uint8


def test_large_latents_decode_a_slice_at_a_time():
  """At 1536² (192² latents) the VAE decodes one image per call; at 256² the whole batch."""
  from dim_jax import sample

  sizes = []

  def decode(z):
    sizes.append(len(z))
    return 2 * z

  for side, want in [(192, [1, 1, 1]), (32, [3])]:
    sizes.clear()
    latents = jnp.arange(3 * side * side * 4, dtype=jnp.float32).reshape(3, side, side, 4)
    np.testing.assert_array_equal(sample.decode_in_slices(decode, latents), 2 * latents)
    assert sizes == want, (side, sizes)
