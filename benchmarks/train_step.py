"""Training-step throughput, model FLOP utilisation and peak memory of DiM on the local devices.

The step is train.make_train_step exactly (ε-MSE, clipped AdamW, EMA), jitted with donation and
the recipe's shardings (configs/pretrain_256.py: FSDP over every device, the batch split over
them) as train.py jits it, on random latents (256²: 32×32×4) and labels; --batch is per device.
Model FLOPs per image are counted analytically (`dim_jax/models/flops.py`, all matmuls, convs and
the scan's elementwise work) times 3 for the forward and backward passes (train_flops_per_image).
The bound is the bf16 matmul rate measured in the same run, times the number of devices. Also:
the largest batch that fits for DiM-H/2 at 512² and 1024² (tried from a list, largest first).

  python -m benchmarks.train_step                      # GPU: DiM-S/L/H at 256², batch search
  python -m benchmarks.train_step --tiny               # CPU smoke run
"""

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import results
from dim_jax import diffusion, parallel, train, train_state
from dim_jax.configs import pretrain_256
from dim_jax.models import dim_preset
from dim_jax.models.flops import dim_flops


def config_for(variant: str, image: int, batch: int, remat: str, scan_impl: str, tiny: bool):
  c = pretrain_256.get_config()
  c.model.update(input_size=image // 8, remat=remat)
  c.model.scan.impl = scan_impl
  if tiny:
    c.model.update(variant="", width=32, depth=5, patch_size=2, dtype="float32")
  else:
    c.model.variant = variant
  c.train.batch_size = batch * jax.device_count()
  return c


def matmul_rate(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def train_flops_per_image(model_config) -> float:
  """Model FLOPs of one training image: 3 × the analytic forward count (the backward pass costs
  about twice the forward); rematerialised recomputation is not counted, as usual for MFU."""
  m = model_config
  arch = dim_preset(m.variant) if m.variant else dict(width=m.width, depth=m.depth)
  patch = arch.pop("patch_size", m.patch_size)
  grid = m.input_size // patch
  forward = dim_flops(
    grid=(grid, grid),
    patch_size=patch,
    in_channels=m.in_channels,
    d_state=m.d_state,
    d_conv=m.d_conv,
    expand=m.expand,
    **arch,
  )
  return 3 * forward.total


def sharded_step(config, mesh=None):
  """(jitted step, init_state, state sharding, batch sharding, mesh) as train.py builds them, on
  `mesh` (default: the config's mesh over every device)."""
  graphdef, init_state, tx, lr = train_state.build_state(config)
  mesh = mesh or parallel.create_mesh(config.mesh)
  state_sharding = parallel.state_shardings(jax.eval_shape(init_state), mesh, config.mesh.rules)
  batch_sharding = parallel.batch_sharding(mesh)
  step = jax.jit(
    train.make_train_step(config, graphdef, tx, lr, diffusion.create_schedule(config.diffusion)),
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )
  return step, init_state, state_sharding, batch_sharding, mesh


def random_batch(config) -> dict:
  """Random latents (global batch, 32, 32, 4) at 256², and labels."""
  size, n = config.model.input_size, config.train.batch_size
  return {
    "image": jax.random.normal(jax.random.key(1), (n, size, size, config.model.in_channels)),
    "label": jnp.arange(n, dtype=jnp.int32) % config.model.num_classes,
  }


def time_step(config, iters: int):
  """Median seconds per step, peak bytes, or (None, error) when it does not fit."""
  step, init_state, state_sharding, batch_sharding, mesh = sharded_step(config)
  batch = jax.device_put(random_batch(config), batch_sharding)
  try:
    state = jax.jit(init_state, out_shardings=state_sharding)()
    with jax.set_mesh(mesh):  # as train.py: the Pallas scan runs per batch shard
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times = []
      for _ in range(iters):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
  except Exception as e:  # out of memory and friends: report, do not stop the table
    return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
  stats = jax.devices()[0].memory_stats() or {}
  return statistics.median(times), stats.get("peak_bytes_in_use", 0)


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="S/2,L/2,H/2")
  p.add_argument("--batch", type=int, default=64, help="per-device batch at 256²")
  p.add_argument("--remat", default="none,block", help="model.remat policies to time")
  p.add_argument("--scan-impl", default="auto", help="model.scan.impl")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--search", default="512:32,24,16,12,8;1024:8,6,4,2,1")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--results", default="benchmarks/RESULTS.md")
  args = p.parse_args(argv)
  if args.tiny:
    args.variants, args.batch, args.iters, args.search = "S/2", 4, 2, "64:4,2"
  peak = matmul_rate(256 if args.tiny else 8192)
  device = f"{jax.devices()[0].device_kind} ×{jax.device_count()}"
  rows = [
    f"| model | remat | batch per device | step ms | img/s | model TFLOP/s | MFU vs "
    f"{jax.device_count()} × {peak / 1e12:.0f} TFLOP/s measured bf16 matmul | "
    "peak GiB (device 0) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for variant in args.variants.split(","):
    for remat in args.remat.split(","):
      config = config_for(variant, 256, args.batch, remat, args.scan_impl, args.tiny)
      flops = train_flops_per_image(config.model)
      seconds, peak_bytes = time_step(config, args.iters)
      if seconds is None:
        rows.append(f"| DiM-{variant} | {remat} | {args.batch} | {peak_bytes} | | | | |")
      else:
        images = args.batch * jax.device_count()
        achieved = flops * images / seconds
        rows.append(
          f"| DiM-{variant} | {remat} | {args.batch} | {seconds * 1e3:.1f} | "
          f"{images / seconds:.1f} | {achieved / 1e12:.1f} | "
          f"{achieved / (peak * jax.device_count()):.1%} | "
          f"{peak_bytes / 2**30:.1f} |"
        )
      print(rows[-1], flush=True)
  rows += [
    "",
    "| model | image | largest batch per device that trains (remat block) | step ms |",
    "| --- | --- | --- | --- |",
  ]
  for item in filter(None, args.search.split(";")):
    image, batches = item.split(":")
    for batch in [int(b) for b in batches.split(",")]:
      config = config_for("H/2", int(image), batch, "block", args.scan_impl, args.tiny)
      seconds, _ = time_step(config, 2)
      if seconds is not None:
        rows.append(f"| DiM-H/2 | {image}² | {batch} | {seconds * 1e3:.0f} |")
        break
    else:
      rows.append(f"| DiM-H/2 | {image}² | none of {batches} | |")
    print(rows[-1], flush=True)
  table = "\n".join(rows)
  print(table)
  header = (
    f"\n## Training step ({datetime.date.today()}, {device}, jax {jax.__version__})\n\n"
    f"`python -m benchmarks.train_step {' '.join(argv)}`\n\n"
  )
  if not args.tiny:
    results.append(args.results, header + table)


if __name__ == "__main__":
  main(sys.argv[1:])
