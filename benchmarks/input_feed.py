"""Each recipe's training step fed by its own input pipeline, against the same step on one batch
held on the devices: what the input costs a run (`train_step.py --feed`).

  fashion_mnist  configs/fashion_mnist.py with model.variant=S/2 and bf16 (DiM-S/2, 32², batch 128;
                 stacked and unstacked blocks), and DiT-S/2 the same (the baseline of the goals)
  pretrain_256   configs/pretrain_256.py (DiM-H/2 on 256² latents, bf16, remat block), 64 images
                 per device
The recipe's data where they are (fashion_mnist: /usr/share/datasets/fashion-mnist), else files of
the same format and size written for the run: random Fashion-MNIST IDX files (60 000 images),
latents written by tools.extract_latents from random moments (float32, 32x32x4).

Columns: compile s (trace, lower, compile; no persistent cache); steps/s on one batch held on the
devices; steps/s fed as train.py feeds them (next host batch, `parallel.global_batch`, the step;
synchronised once at the end, so input and device work overlap as they do in training); the
pipeline alone (batches/s, no device work); fed / held.
"""

import os
import tempfile
import time

import jax
import numpy as np

from configs import fashion_mnist, pretrain_256
from dim_jax import data, parallel
from dim_jax.data import fashion_mnist as fmnist_source
from dim_jax.tools.extract_latents import extract_latents

FMNIST_EXAMPLES, LATENT_EXAMPLES = 60_000, 2048


def write_fashion_mnist(folder: str, count: int) -> str:
  """Random Fashion-MNIST training files (IDX, uncompressed) in `folder`; returns it."""
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  arrays = {
    "images-idx3": rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
    "labels-idx1": rng.integers(0, 10, (count,), dtype=np.uint8),
  }
  for stem, array in arrays.items():
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with open(os.path.join(folder, f"train-{stem}-ubyte"), "wb") as f:
      f.write(header + array.tobytes())
  return folder


def write_latents(folder: str, count: int, side: int) -> str:
  """Latents of random moments, (side, side, 4), as --mode=extract_latents writes them."""
  rng = np.random.default_rng(0)

  def encoder(images):
    mean = rng.normal(size=(images.shape[0], side, side, 4)).astype(np.float32)
    return mean, np.full_like(mean, -3.0)

  source = dict(name="shapes", image_size=8, num_examples=count, worker_count=0)
  extract_latents(encoder, source, folder, batch_size=64, dtype="float32")
  return folder


def recipes(tiny: bool, scan_impl: str, scratch: str) -> list[tuple[str, object]]:
  """(label, config) of every row."""
  fmnist_dir = fmnist_source.DEFAULT_DIR
  if tiny or not os.path.isdir(fmnist_dir):
    count = 512 if tiny else FMNIST_EXAMPLES
    fmnist_dir = write_fashion_mnist(os.path.join(scratch, "fmnist"), count)
  rows = []
  for name, stack in (("dim", True), ("dit", False)):
    c = fashion_mnist.get_config()
    c.model.update(name=name, variant="S/2", dtype="bfloat16", stack_blocks=stack)
    c.data.data_dir = fmnist_dir
    if tiny:
      c.model.update(variant="", width=32, depth=9, num_heads=2)
      c.train.batch_size = 8
    label = f"fashion_mnist {'DiM' if name == 'dim' else 'DiT'}-S/2"
    rows.append((label + (f", stack_blocks {int(stack)}" if name == "dim" else ""), c))
  c = pretrain_256.get_config()
  side = c.model.input_size
  c.data.data_dir = write_latents(
    os.path.join(scratch, "latents"), LATENT_EXAMPLES // 8**tiny, side
  )
  c.train.batch_size = (4 if tiny else 64) * jax.device_count()
  if tiny:
    c.model.update(variant="", width=32, depth=9, dtype="float32")
  rows.append(("pretrain_256 DiM-H/2, remat block", c))
  c = rows[0][1].copy_and_resolve_references()  # unstacked last: the costliest compile
  c.model.stack_blocks = False
  rows.append(("fashion_mnist DiM-S/2, stack_blocks 0", c))
  for _, c in rows:
    c.model.scan.impl = scan_impl
  return rows


def fed_seconds(steps, config, num_steps: int) -> tuple[float, float, float]:
  """(held, fed, pipeline alone) seconds per step of `config`'s compiled step."""
  compiled, init_state, state_sharding, batch_sharding = steps(config)[:4]
  mesh = state_sharding["step"].mesh
  rows = parallel.local_rows(mesh, config.train.batch_size)
  iterator = data.create_train_iterator(
    config.data, batch_size=config.train.batch_size, seed=config.seed, rows=rows
  )
  state = steps.initial_state(config, init_state, state_sharding)
  held = parallel.global_batch(next(iterator), mesh)

  def run(batches) -> float:
    nonlocal state
    with jax.set_mesh(mesh):
      state, metrics = compiled(state, next(batches))  # warm-up
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(num_steps):
        state, metrics = compiled(state, next(batches))
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / num_steps

  def same():
    while True:
      yield held

  def fed():
    while True:
      yield parallel.global_batch(next(iterator), mesh)

  held_s, fed_s = run(same()), run(fed())
  start = time.perf_counter()
  for _ in range(num_steps):
    next(iterator)
  return held_s, fed_s, (time.perf_counter() - start) / num_steps


def feed_rows(steps, args, deadline: float) -> list[str]:
  """The --feed table (module docstring)."""
  rows = [
    "| recipe | global batch | compile s | steps/s, one batch held | steps/s, fed by the pipeline "
    "| pipeline alone, batches/s | fed / held |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  with tempfile.TemporaryDirectory() as scratch:
    for label, config in recipes(args.tiny, args.scan_impl, scratch):
      head = f"| {label} | {config.train.batch_size} |"
      if time.perf_counter() > deadline:
        rows.append(f"{head} skipped: --budget-s spent | | | | |")
        continue
      try:
        compile_s = steps(config)[4]
        num_steps = 3 if args.tiny else 10 if "pretrain" in label else 30
        held, fed, alone = fed_seconds(steps, config, num_steps)
      except Exception as e:  # out of memory and friends: report, do not stop the table
        rows.append(f"{head} {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |")
      else:
        rows.append(
          f"{head} {compile_s:.1f} | {1 / held:.2f} | {1 / fed:.2f} | {1 / alone:.1f} "
          f"| {held / fed:.1%} |"
        )
      print(rows[-1], flush=True)
  return rows
