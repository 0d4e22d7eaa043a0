"""Generation: a jitted sampler over the backbone, uint8 images, PNG grids and `.npz` files."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from dim_jax import diffusion, files, train_state


def sample_labels(num_images: int, num_classes: int, unconditional: bool) -> np.ndarray:
  """Classes cycled 0, 1, ..., or all the null class for an unconditional model."""
  if unconditional:
    return np.full((num_images,), num_classes, np.int32)
  return (np.arange(num_images) % num_classes).astype(np.int32)


def upsample_guidance(sample_config) -> diffusion.UpsampleGuidance | None:
  """The `sample.upsample` block (validated), or None when it is off (scale 1)."""
  guidance = diffusion.UpsampleGuidance(**sample_config.upsample.to_dict())
  return guidance if guidance.scale > 1 else None


def sample_side(config) -> int:
  """The sampled side: the trained `model.input_size`, times m under upsample guidance."""
  guidance = upsample_guidance(config.sample)
  return config.model.input_size * (guidance.scale if guidance else 1)


def make_sampler(graphdef, schedule, sample_config, null_label: int):
  """A jitted (params, noise (B, H, W, C), labels (B,), rng) -> images (B, H, W, C) in [-1, 1]."""
  options = dict(
    sampler=sample_config.sampler,
    steps=sample_config.steps,
    guidance_scale=sample_config.guidance_scale,
    eta=sample_config.eta,
    null_label=null_label,
    upsample=upsample_guidance(sample_config),
  )

  @jax.jit
  def sample_batch(params, noise, labels, rng):
    model = nnx.merge(graphdef, params)
    return diffusion.sample(model, schedule, noise, labels, rng, **options)

  return sample_batch


# The VAE decoder's mid-block attention holds (b, L, L) float32 logits, L = latent pixels: 5.4 GB
# per image at 1536² (L = 192²), 1.1 GB at 1024². Decoding a slice of the batch at a time keeps
# them under this budget (whole batches at 256² and 512²; one image at a time at 1536²).
DECODE_LOGITS_BYTES = 8 * 2**30


def decode_in_slices(decode, latents: jax.Array) -> jax.Array:
  """(B, h, w, 4) latents -> (B, 8h, 8w, 3) images, at most DECODE_LOGITS_BYTES of logits a call."""
  per_image = 4 * (latents.shape[1] * latents.shape[2]) ** 2
  size = max(1, DECODE_LOGITS_BYTES // per_image)
  return jnp.concatenate([decode(latents[i : i + size]) for i in range(0, len(latents), size)])


def load_decoder(config):
  """Latent models decode their samples with the VAE of `vae.path`; pixel models need none."""
  if not config.vae.path:
    return None
  from dim_jax.models import layers, vae, vae_weights

  model = vae_weights.load_vae(config.vae.path, dtype=layers.compute_dtype(config.vae.dtype))
  return vae.make_decode_fn(model)


def drawn_labels(config, num_images: int) -> np.ndarray | None:
  """The classes that `generate_batches` draws, or None for an unconditional model."""
  if config.diffusion.p_uncond >= 1.0:
    return None
  return sample_labels(num_images, config.model.num_classes, unconditional=False)


def generate_batches(run, params, *, config, num_images: int, rng: jax.Array, decode=None):
  """Yields samples in batches of sample.batch_size, (b, H, W, C) in [-1, 1], decoded by `decode`
  (`load_decoder`) when given: never more than one batch of images in memory. `run` is a
  `make_sampler` function, made once so that repeated calls compile once."""
  model_cfg, sample_cfg = config.model, config.sample
  side = sample_side(config)
  shape = (side, side, model_cfg.in_channels)
  labels = sample_labels(num_images, model_cfg.num_classes, config.diffusion.p_uncond >= 1.0)
  for start in range(0, num_images, sample_cfg.batch_size):
    rng, noise_rng, sample_rng = jax.random.split(rng, 3)
    batch_labels = jnp.asarray(labels[start : start + sample_cfg.batch_size])
    noise = jax.random.normal(noise_rng, (len(batch_labels), *shape), jnp.float32)
    x = run(params, noise, batch_labels, sample_rng)
    if decode is not None:
      x = decode_in_slices(decode, x)
    logging.log_every_n_seconds(
      logging.INFO, "sampled %d / %d images", 10, start + len(batch_labels), num_images
    )
    yield np.asarray(jax.device_get(x))


def generate(run, params, *, config, num_images: int, rng: jax.Array, decode=None) -> np.ndarray:
  """`num_images` samples -> (N, H, W, C) in [-1, 1] (see `generate_batches`)."""
  batches = generate_batches(
    run, params, config=config, num_images=num_images, rng=rng, decode=decode
  )
  return np.concatenate(list(batches))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8, rounding as the field does (clip, scale by 127.5, round)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image, as square as possible, 2-px gaps."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * (h + 2) : r * (h + 2) + h, q * (w + 2) : q * (w + 2) + w] = image
  return grid


def save_grid(path: str, images_uint8: np.ndarray) -> str:
  grid = image_grid(images_uint8)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def check_config(config) -> None:
  """A bad sampler or sample.upsample block fails here, before any restore or compile."""
  diffusion.validate(config.sample.sampler, config.sample.steps, config.sample.eta)
  upsample_guidance(config.sample)


def sample_from_workdir(
  config, workdir: str, *, num_images: int | None = None, out: str | None = None
) -> str:
  """--mode=sample: EMA parameters of the latest checkpoint -> PNG grid and .npz of uint8 images,
  in `out` (default: the workdir), under a name no earlier sampling has used."""
  check_config(config)
  out = out or workdir
  files.check_writable(out, "--out" if out != workdir else "--workdir")
  graphdef, params, step = train_state.restore_for_sampling(config, workdir)
  num_images = num_images or config.sample.num_images
  schedule = diffusion.create_schedule(config.diffusion)
  rng = jax.random.key(config.seed + 2)
  run = make_sampler(graphdef, schedule, config.sample, config.model.num_classes)
  images = to_uint8(
    generate(
      run, params, config=config, num_images=num_images, rng=rng, decode=load_decoder(config)
    )
  )
  name = f"sample_{config.sample.sampler}_{config.sample.steps}steps_step{step}"
  guidance = upsample_guidance(config.sample)
  if guidance:  # apart from the grid at the trained size
    name += f"_upsample{guidance.scale}x"
  stem = files.unused_stem(os.path.join(out, name), (".png", ".npz"))
  path = save_grid(stem + ".png", images)
  np.savez(stem + ".npz", images=images)
  logging.info("Wrote %s and %s.npz", path, stem)
  return path
