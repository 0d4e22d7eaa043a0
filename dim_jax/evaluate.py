"""Evaluation modes: FID / sFID / IS / precision / recall of samples, reference statistics, latents.

--mode=evaluate        sample eval.num_samples images from the workdir's EMA parameters, stream
                       them through the evaluator that fits the config (`evaluators`: the FID
                       InceptionV3, or a data set's own classifier), never holding them all, and
                       write the metrics through the metric writer and to <workdir>/eval_<step>.json
--mode=ref_stats       Inception statistics of the data set in `data`, to eval.ref_stats
--mode=extract_latents VAE posterior moments of the image set in `data`, to extract.out_dir
"""

import json
import os

import jax
from absl import logging

from dim_jax import data, diffusion, eval_metrics, evaluators, metrics, sample, train_state
from dim_jax.models import inception


def _feature_fn(config):
  return inception.make_feature_fn(inception.load_inception(config.eval.inception_path))


GRID_IMAGES = 64  # samples in the grid written beside the metrics


def sample_and_measure(config, run, params, evaluator, *, num_images: int, decode=None):
  """Samples `num_images` with the jitted sampler `run` (the same noise at every call) and measures
  them with `evaluator` (None: only the grid). Returns (metrics, uint8 grid (1, H, W, C))."""
  batches = sample.generate_batches(
    run,
    params,
    config=config,
    num_images=num_images,
    rng=jax.random.key(config.seed + 3),
    decode=decode,
  )
  if evaluator is None:
    return {}, sample.image_grid(sample.to_uint8(next(batches)[:GRID_IMAGES]))[None]
  first = []

  def keep_first(batches):
    for batch in batches:
      if not first:
        first.append(sample.to_uint8(batch[:GRID_IMAGES]))
      yield batch

  results = evaluator(keep_first(batches), sample.drawn_labels(config, num_images))
  return results, sample.image_grid(first[0])[None]


def write_results(workdir: str, writer, step: int, results: dict, grid, **extra) -> None:
  """Metrics and grid through the metric writer; metrics and `extra` to eval_<step>.json."""
  writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
  writer.write_images(step, {"eval/samples": grid})
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(dict(results, step=step, **extra), f)


def evaluate(config, workdir: str) -> dict:
  """The metrics of `evaluators.create` (FID with Inception weights, FD-FMNIST / FD-shapes on
  those data sets) of eval.num_samples samples of the workdir's latest checkpoint."""
  sample.check_config(config)
  evaluator = evaluators.create(config)
  if evaluator is None:
    raise ValueError(
      f"--mode=evaluate has no metric for data.name={config.data.name!r}: set "
      "--config.eval.inception_path (convert_inception) and --config.eval.ref_stats."
    )
  graphdef, params, step = train_state.restore_for_sampling(config, workdir)
  schedule = diffusion.create_schedule(config.diffusion)
  run = sample.make_sampler(graphdef, schedule, config.sample, config.model.num_classes)
  results, grid = sample_and_measure(
    config,
    run,
    params,
    evaluator,
    num_images=config.eval.num_samples,
    decode=sample.load_decoder(config),
  )
  write_results(
    workdir,
    metrics.create_writer(workdir),
    step,
    results,
    grid,
    sampler=config.sample.sampler,
    steps=config.sample.steps,
    guidance_scale=config.sample.guidance_scale,
  )
  logging.info("Evaluation at step %d: %s", step, evaluator.summary(results))
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
