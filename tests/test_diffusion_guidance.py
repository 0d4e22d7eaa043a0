"""Classifier-free guidance: one batched call equals two separate ones; w = 1 is the conditional
model alone, with no unconditional pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dim_jax import diffusion
from tests.test_diffusion_schedules import schedule_config

NULL = 5


def toy_denoiser(seed: int):
  """A label- and time-dependent ε̂, in JAX, its float64 NumPy twin, and a log of its calls."""
  weights = np.random.default_rng(seed).normal(size=(NULL + 1, 2, 2, 3))
  calls = []

  def jax_fn(x, t_net, y):
    calls.append(x.shape[0])
    return jnp.tanh(x * jnp.asarray(weights, x.dtype)[y] + t_net[:, None, None, None] / 1000)

  def numpy_fn(x, t_net, y):
    return np.tanh(x * weights[y] + t_net[:, None, None, None] / 1000)

  return jax_fn, numpy_fn, calls


@pytest.fixture
def inputs():
  seed = int(np.random.SeedSequence().entropy % 2**31)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
  t_net = rng.uniform(0, 1000, 6).astype(np.float32)
  labels = rng.integers(0, NULL, 6).astype(np.int32)
  return seed, x, t_net, labels


def test_scale_one_is_the_conditional_model_in_one_pass(inputs):
  seed, x, t_net, labels = inputs
  jax_fn, numpy_fn, calls = toy_denoiser(seed)
  got = diffusion.guided_eps(jax_fn, x, t_net, labels, guidance_scale=1.0, null_label=NULL)
  assert calls == [6], f"expected one conditional call of batch 6, got {calls}"
  want = numpy_fn(x.astype(np.float64), t_net, labels)
  np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"seed {seed}")


@pytest.mark.parametrize("scale", [0.0, 1.4, 4.0])
def test_one_batched_call_equals_two_separate_calls(inputs, scale):
  seed, x, t_net, labels = inputs
  jax_fn, numpy_fn, calls = toy_denoiser(seed)
  got = diffusion.guided_eps(jax_fn, x, t_net, labels, guidance_scale=scale, null_label=NULL)
  assert calls == [12], f"expected one call of batch 2B = 12, got {calls}"
  x64 = x.astype(np.float64)
  eps_c = numpy_fn(x64, t_net, labels)
  eps_u = numpy_fn(x64, t_net, np.full_like(labels, NULL))
  np.testing.assert_allclose(got, eps_u + scale * (eps_c - eps_u), atol=1e-5, err_msg=str(seed))


def test_sampler_with_guidance_equals_sampler_on_the_guided_model(inputs):
  """The whole jitted sampler: guidance inside it equals a model that guides by two passes."""
  seed, x, _, labels = inputs
  jax_fn, _, _ = toy_denoiser(seed)
  schedule = diffusion.create_schedule(schedule_config("discrete"))
  scale = 1.7

  def two_pass(x, t_net, y):
    eps_c, eps_u = jax_fn(x, t_net, y), jax_fn(x, t_net, jnp.full_like(y, NULL))
    return eps_c + (scale - 1.0) * (eps_c - eps_u)  # the official form, s = w - 1

  def run(fn, w):
    return jax.jit(
      lambda noise: diffusion.sample(
        fn,
        schedule,
        noise,
        labels,
        jax.random.key(0),
        sampler="ddim",
        steps=8,
        guidance_scale=w,
        null_label=NULL,
      )
    )(x)

  np.testing.assert_allclose(run(jax_fn, scale), run(two_pass, 1.0), atol=2e-5, err_msg=str(seed))
