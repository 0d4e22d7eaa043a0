"""Evaluation modes: FID / sFID / IS / precision / recall of samples, reference statistics, latents.

--mode=evaluate        sample eval.num_samples images from the workdir's EMA parameters, stream
                       them through the FID InceptionV3 (never holding them all) and write the
                       metrics through the metric writer and to <workdir>/eval_<step>.json
--mode=ref_stats       Inception statistics of the data set in `data`, to eval.ref_stats
--mode=extract_latents VAE posterior moments of the image set in `data`, to extract.out_dir
"""

import json
import os

import jax
from absl import logging

from dim_jax import data, diffusion, eval_metrics, metrics, sample, train_state
from dim_jax.models import inception


def _feature_fn(config):
  return inception.make_feature_fn(inception.load_inception(config.eval.inception_path))


def evaluate(config, workdir: str) -> dict:
  sample.check_config(config)
  feature_fn = _feature_fn(config)
  ref = eval_metrics.load_reference_stats(config.eval.ref_stats, feature_fn)
  graphdef, params, step = train_state.restore_for_sampling(config, workdir)
  schedule = diffusion.create_schedule(config.diffusion)
  batches = sample.generate_batches(
    graphdef,
    params,
    schedule,
    config=config,
    num_images=config.eval.num_samples,
    rng=jax.random.key(config.seed + 3),
  )
  first = []

  def keep_first(batches):
    for batch in batches:
      if not first:
        first.append(sample.to_uint8(batch[:64]))
      yield batch

  results = eval_metrics.evaluate_samples(keep_first(batches), feature_fn, ref)
  writer = metrics.create_writer(workdir)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
  writer.write_images(step, {"eval/samples": sample.image_grid(first[0])[None]})
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(
        dict(
          results,
          step=step,
          sampler=config.sample.sampler,
          steps=config.sample.steps,
          guidance_scale=config.sample.guidance_scale,
        ),
        f,
      )
  logging.info("Evaluation at step %d: %s", step, results)
  return results


def reference_stats(config, workdir: str) -> str:
  """Inception statistics of one pass over the data set's images (eval.num_samples at most)."""
  if not config.eval.ref_stats:
    raise ValueError("--mode=ref_stats writes to eval.ref_stats: set --config.eval.ref_stats=PATH.")
  feature_fn = _feature_fn(config)
  local, index = config.eval.batch_size, jax.process_index()
  it = data.create_train_iterator(  # each process reads its own block of every global batch
    config.data,
    batch_size=local * jax.process_count(),
    seed=config.seed,
    rows=(index * local, (index + 1) * local),
  )
  num_batches = max(1, config.eval.num_samples // config.eval.batch_size)
  images = (sample.to_uint8(next(it)["image"]) for _ in range(num_batches))
  stats = eval_metrics.compute_reference_stats(images, feature_fn)
  eval_metrics.save_reference_stats(config.eval.ref_stats, stats)
  logging.info(
    "Wrote reference statistics of %d images to %s",
    num_batches * config.eval.batch_size,
    config.eval.ref_stats,
  )
  return config.eval.ref_stats


def extract_latents(config, workdir: str) -> dict:
  """Encodes the image set of `data` with the VAE of `vae.path` into extract.out_dir."""
  from dim_jax.models import layers, vae, vae_weights
  from dim_jax.tools import extract_latents as writer

  if not config.vae.path or not config.extract.out_dir:
    raise ValueError(
      "--mode=extract_latents needs --config.vae.path=<SD VAE weights> and "
      "--config.extract.out_dir=<folder for the latents>."
    )
  model = vae_weights.load_vae(config.vae.path, dtype=layers.compute_dtype(config.vae.dtype))
  counts = writer.extract_latents(
    vae.make_moments_fn(model),
    config.data,
    config.extract.out_dir,
    batch_size=config.extract.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    dtype=config.extract.dtype,
  )
  logging.info("Extracted latents to %s: %s", config.extract.out_dir, counts)
  del workdir
  return counts


MODES = {"evaluate": evaluate, "ref_stats": reference_stats, "extract_latents": extract_latents}
