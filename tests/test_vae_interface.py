"""The VAE's interface: encode -> decode shapes at 256² and 512² with the real SD widths (under
eval_shape, no FLOPs), float32 outputs in bf16, the unclipped decoder and the clipping helper,
the posterior's sample / mode and log-variance clamp, the 0.18215 scale, bad shapes refused, and
the jitted encode / decode functions split over the batch of a 4-device mesh."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax.models.vae import LATENT_SCALE, AutoencoderKL, VAEConfig, random_vae, to_images

TINY = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_groups=4)


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_sd_encode_decode_shapes(size, dtype):
  vae = nnx.eval_shape(lambda: AutoencoderKL(dtype=dtype, rngs=nnx.Rngs(0)))
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  posterior = nnx.eval_shape(lambda vae, x: vae.encode(x), vae, images)
  for moment in (posterior.mean, posterior.logvar):
    assert moment.shape == (2, size // 8, size // 8, 4) and moment.dtype == jnp.float32
  latents = nnx.eval_shape(lambda vae, x: vae.encode_latents(x), vae, images)
  decoded = nnx.eval_shape(lambda vae, z: vae.decode_latents(z), vae, latents)
  assert decoded.shape == (2, size, size, 3) and decoded.dtype == jnp.float32


def test_any_size_divisible_by_8_and_bad_shapes_refused():
  vae = nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))
  wide = nnx.eval_shape(
    lambda vae, x: vae.encode(x), vae, jax.ShapeDtypeStruct((1, 136, 392, 3), jnp.float32)
  )
  assert wide.mean.shape == (1, 17, 49, 4)
  for shape in [(1, 100, 64, 3), (1, 64, 64, 4), (64, 64, 3)]:
    with pytest.raises(ValueError, match="multiples of 8"):
      nnx.eval_shape(lambda vae, x: vae.encode(x), vae, jax.ShapeDtypeStruct(shape, jnp.float32))
  with pytest.raises(ValueError, match=r"\(B, H, W, 4\)"):
    nnx.eval_shape(
      lambda vae, z: vae.decode(z), vae, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    )
  with pytest.raises(ValueError, match="multiple of norm_groups=32"):
    VAEConfig(block_out_channels=(128, 200))


def test_decoder_output_is_float32_unclipped_and_to_images_clips():
  """decode returns the raw decoder output (float32, even in bf16); to_images clips to [-1, 1]."""
  rng, seed = _rng()
  vae = random_vae(TINY, dtype=jnp.bfloat16, seed=seed)
  latents = jnp.asarray(3.0 * rng.standard_normal((2, 2, 3, 4)), jnp.float32)
  decoded = nnx.jit(lambda vae, z: vae.decode(z))(vae, latents)
  assert decoded.dtype == jnp.float32 and decoded.shape == (2, 16, 24, 3)
  values = np.asarray(decoded)
  assert np.abs(values).max() > 1.0, f"a random decoder should overshoot [-1, 1]; seed {seed}"
  images = np.asarray(to_images(decoded))
  np.testing.assert_array_equal(images, np.minimum(np.maximum(values, -1.0), 1.0))


def test_posterior_sample_mode_clamp_and_scale():
  rng, seed = _rng()
  vae = random_vae(TINY, seed=seed)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  posterior = vae.encode(images)
  mean, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
  eps = np.asarray(jax.random.normal(key, mean.shape), np.float64)
  expected = mean + np.exp(logvar / 2) * eps
  np.testing.assert_allclose(
    posterior.sample(key), expected, rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}"
  )
  np.testing.assert_array_equal(posterior.mode(), posterior.mean)

  assert LATENT_SCALE == 0.18215 and vae.config.scaling_factor == LATENT_SCALE
  np.testing.assert_allclose(vae.encode_latents(images), 0.18215 * mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    vae.encode_latents(images, key), 0.18215 * expected, rtol=1e-5, atol=1e-6
  )
  latents = jnp.asarray(rng.standard_normal((2, 2, 2, 4)), jnp.float32)
  np.testing.assert_allclose(
    vae.decode_latents(latents), vae.decode(latents / 0.18215), rtol=1e-6, atol=1e-6
  )

  # LDM clamps the log-variance to [-30, 20]: drive the moments with quant_conv's bias alone.
  vae.quant_conv.kernel[...] = jnp.zeros_like(vae.quant_conv.kernel[...])
  vae.quant_conv.bias[...] = jnp.asarray([0.5, -0.5, 2.0, 0.0, 50.0, -45.0, 3.0, -29.0])
  clamped = vae.encode(images)
  np.testing.assert_array_equal(clamped.mean, np.broadcast_to([0.5, -0.5, 2.0, 0.0], (2, 2, 2, 4)))
  np.testing.assert_array_equal(
    clamped.logvar, np.broadcast_to([20.0, -30.0, 3.0, -29.0], (2, 2, 2, 4))
  )


_SHARDED = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from dim_jax.models.vae import make_decode_fn, make_moments_fn, random_vae
  from tests.test_vae_interface import TINY
  assert jax.device_count() == 4
  seed = np.random.SeedSequence().entropy
  rng = np.random.default_rng(seed)
  vae = random_vae(TINY, seed=seed)
  mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  images = rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
  mean, logvar = make_moments_fn(vae, mesh)(images)
  ref_mean, ref_logvar = make_moments_fn(vae)(images)
  direct = vae.encode(jnp.asarray(images))
  assert len({s.device for s in mean.addressable_shards}) == 4, mean.sharding
  assert all(s.data.shape[0] == 2 for s in mean.addressable_shards), mean.sharding
  for got, want in ((mean, ref_mean), (logvar, ref_logvar), (ref_mean, direct.mean)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
  latents = rng.standard_normal((8, 2, 2, 4)).astype(np.float32)
  images_out = make_decode_fn(vae, mesh)(latents)
  want = np.clip(np.asarray(vae.decode(jnp.asarray(latents) / 0.18215)), -1, 1)
  assert all(s.data.shape[0] == 2 for s in images_out.addressable_shards)
  np.testing.assert_allclose(images_out, want, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
  print("ok")
  """
)


def test_jitted_encode_decode_split_over_the_batch():
  """make_moments_fn / make_decode_fn on a 2x2 mesh of fake CPU devices: each device gets a
  quarter of the batch and the results equal the single-device ones."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", _SHARDED], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
