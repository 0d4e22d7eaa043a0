"""Training-step throughput, model FLOP utilisation, compile time and memory of DiM on the local
devices.

The step is train.make_train_step exactly (ε-MSE, clipped AdamW, EMA), jitted with donation and
the recipe's shardings (configs/pretrain_256.py: FSDP over every device, the batch split over
them) as train.py jits it, on random latents (256²: 32×32×4) and labels; --batch is per device.
Model FLOPs per image are counted analytically (`dim_jax/models/flops.py`, all matmuls, convs and
the scan's elementwise work) times 3 for the forward and backward passes (train_flops_per_image).
The bound is the bf16 matmul rate measured in the same run, times the number of devices.

Per row (model.remat x model.stack_blocks): step ms, img/s, MFU; compile s (tracing, lowering and
compiling the step with the persistent compilation cache off: what a first run pays); planned GiB
(per device, from the compiled step: arguments + outputs - donated + temporaries). Then, each
when asked: the largest batch that fits for DiM-H/2 at 512² and 1024² (--search, tried from a
list, largest first); the step fed by each recipe's input pipeline against the same step on one
batch held on the device (--feed, benchmarks/input_feed.py); the time split of the step between
the scan, the matmuls, the token permutations and the rest, each against its floor, per
resolution (--breakdown, benchmarks/time_split.py). --budget-s starts no new row once spent.

  python -m benchmarks.train_step                      # GPU: DiM-S/L/H at 256², batch search
  python -m benchmarks.train_step --variants H/2 --remat none,block,save_scan --stack 1,0 \\
      --feed --breakdown 256 --search ""               # the compile / remat / feed / split run
  python -m benchmarks.train_step --tiny --feed --breakdown 256   # CPU smoke run
"""

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import input_feed, results, time_split
from benchmarks import scan as scan_bench
from dim_jax import diffusion, parallel, train, train_state
from dim_jax.configs import pretrain_256
from dim_jax.models import dim_preset
from dim_jax.models.flops import dim_flops, dim_sequence_length


def config_for(
  variant: str, image: int, batch: int, remat: str, scan_impl: str, tiny: bool, stack=False
):  # fmt: skip
  """configs/pretrain_256.py at `image`² (latents image / 8), `batch` per device."""
  c = pretrain_256.get_config()
  c.model.update(input_size=image // 8, remat=remat, stack_blocks=stack)
  c.model.scan.impl = scan_impl
  if tiny:  # depth 9: too few blocks to stack (dim_blocks.MIN_GROUPS), each compiled alone
    c.model.update(variant="", width=32, depth=9, patch_size=2, dtype="float32")
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


def compile_step(config, mesh=None):
  """(compiled step, init_state, state sharding, batch sharding, seconds to trace, lower and
  compile it) for a global batch of `config.train.batch_size`."""
  step, init_state, state_sharding, batch_sharding, mesh = sharded_step(config, mesh)
  n, size = config.train.batch_size, config.model.input_size
  batch = {
    "image": jax.ShapeDtypeStruct((n, size, size, config.model.in_channels), jnp.float32),
    "label": jax.ShapeDtypeStruct((n,), jnp.int32),
  }
  batch = jax.tree.map(lambda a: a.update(sharding=batch_sharding), batch)
  state = jax.tree.map(
    lambda a, s: a.update(sharding=s), jax.eval_shape(init_state), state_sharding
  )
  t = time.perf_counter()
  with jax.set_mesh(mesh):  # as train.py: the Pallas scan then runs per batch shard
    compiled = step.lower(state, batch).compile()
  return compiled, init_state, state_sharding, batch_sharding, time.perf_counter() - t


def planned_bytes(compiled) -> int:
  """Per device: arguments + outputs - donated + temporaries of a compiled step."""
  m = compiled.memory_analysis()
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


class Steps:
  """Compiled steps by config, each compiled once (the rows, the feed and the split share them),
  and initial train states by parameter layout, made once and kept on the host."""

  def __init__(self):
    self.compiled, self.host_states = {}, {}

  def __call__(self, config):
    """compile_step's tuple for `config`."""
    key = str(dict(config.to_dict(), data=None))  # the input's files do not change the step
    if key not in self.compiled:
      self.compiled[key] = compile_step(config)
    return self.compiled[key]

  def initial_state(self, config, init_state, sharding):
    m = config.model
    key = (m.variant, m.width, m.depth, m.input_size, m.in_channels, m.stack_blocks, m.name)
    if key not in self.host_states:
      self.host_states[key] = jax.device_get(jax.jit(init_state)())
    return jax.device_put(self.host_states[key], sharding)


def time_step(steps: Steps, config, iters: int) -> dict:
  """{step_s, compile_s, planned_bytes} of the config's step on one batch held on the devices
  (median of `iters` steps after one; none for 0), or {error} when it does not compile or fit."""
  try:
    compiled, init_state, state_sharding, batch_sharding = steps(config)[:4]
    row = dict(compile_s=steps(config)[4], planned_bytes=planned_bytes(compiled))
    if iters == 0:
      return row
    state = steps.initial_state(config, init_state, state_sharding)
    batch = jax.device_put(random_batch(config), batch_sharding)
    step_s = median_step_seconds(compiled, state, batch, iters)
  except Exception as e:  # out of memory and friends: report, do not stop the table
    return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}".replace("|", "/"))
  return dict(row, step_s=step_s)


def median_step_seconds(compiled, state, batch, iters: int) -> float:
  """Median wall time of `iters` steps of the compiled train step, after one untimed step."""
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def step_header(peak: float) -> list[str]:
  devices = jax.device_count()
  return [
    f"| model | remat | stack_blocks | batch per device | step ms | img/s | model TFLOP/s | MFU vs "
    f"{devices} × {peak / 1e12:.0f} TFLOP/s measured bf16 matmul | compile s | planned GiB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]


def step_row(steps: Steps, args, peak: float, deadline: float, variant, remat, stack) -> str:
  """One row of the step table at 256²."""
  head = f"| DiM-{variant} | {remat} | {int(stack)} | {args.batch} |"
  if time.perf_counter() > deadline:
    return f"{head} skipped: --budget-s spent | | | | | |"
  config = config_for(variant, 256, args.batch, remat, args.scan_impl, args.tiny, stack)
  r = time_step(steps, config, args.iters)
  if "error" in r:
    return f"{head} {r['error']} | | | | | |"
  memory = f"{r['compile_s']:.1f} | {r['planned_bytes'] / 2**30:.1f} |"
  if "step_s" not in r:  # --iters 0: compile only
    return f"{head} – | – | – | – | {memory}"
  images = args.batch * jax.device_count()
  achieved = train_flops_per_image(config.model) * images / r["step_s"]
  return (
    f"{head} {r['step_s'] * 1e3:.1f} | {images / r['step_s']:.1f} | {achieved / 1e12:.1f} | "
    f"{achieved / (peak * jax.device_count()):.1%} | {memory}"
  )


def search_rows(steps: Steps, args, deadline: float) -> list[str]:
  """The largest per-device batch of DiM-H/2 (remat block) that trains, per image size."""
  rows = [
    "| model | image | largest batch per device that trains (remat block) | step ms |",
    "| --- | --- | --- | --- |",
  ]
  for item in filter(None, args.search.split(";")):
    image, batches = item.split(":")
    for batch in [int(b) for b in batches.split(",")]:
      if time.perf_counter() > deadline:
        rows.append(f"| DiM-H/2 | {image}² | skipped: --budget-s spent | |")
        break
      config = config_for("H/2", int(image), batch, "block", args.scan_impl, args.tiny)
      r = time_step(steps, config, 2)
      if "step_s" in r:
        rows.append(f"| DiM-H/2 | {image}² | {batch} | {r['step_s'] * 1e3:.0f} |")
        break
    else:
      rows.append(f"| DiM-H/2 | {image}² | none of {batches} | |")
    print(rows[-1], flush=True)
  return rows


def split_rows(steps: Steps, args, rates: dict, deadline: float) -> list[dict]:
  """The time split of the first variant's step (its first remat) per --breakdown resolution,
  at the per-device batch that holds as many tokens as --batch does at 256²."""
  variant, remat = args.variants.split(",")[0], args.remat.split(",")[0]
  splits = []
  for image in (int(r) for r in args.breakdown.split(",")):
    batch = max(1, args.batch * 256**2 // image**2)
    config = config_for(variant, image, batch, remat, args.scan_impl, args.tiny)
    times = {}
    for ablation in time_split.ABLATIONS:
      if time.perf_counter() > deadline:
        break
      ablated = config
      if ablation:
        ablated = ml_collections.ConfigDict(config.to_dict())
        ablated.model = time_split.ablated(config.model, ablation)
      r = time_step(steps, ablated, args.iters)
      if "step_s" in r:
        times[ablation] = r["step_s"]
      print(f"  split {variant} {image}² {ablation or 'full'}: {r}", flush=True)
    if len(times) < len(time_split.ABLATIONS):
      continue
    m = config.model
    arch = dim_preset(variant) if not args.tiny else dict(width=m.width, depth=m.depth)
    arch.setdefault("patch_size", m.patch_size)
    grid = m.input_size // arch["patch_size"]
    length = dim_sequence_length((grid, grid))
    shapes = time_split.matmul_shapes(arch, m, length, grid * grid)
    images = batch * jax.device_count()
    matmuls = time_split.matmul_seconds(shapes, batch, train=True, remat=remat)
    splits.append(
      dict(
        label=f"DiM-{variant} {image}², batch {images}, remat {remat}",
        parts=time_split.split(times, matmuls),
        floors=time_split.floors(arch, m, batch, grid, rates, train=True),
        total=times[""],
      )
    )
  return splits


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="S/2,L/2,H/2")
  p.add_argument("--batch", type=int, default=64, help="per-device batch at 256²")
  p.add_argument("--remat", default="none,block", help="model.remat policies to time")
  p.add_argument(
    "--stack",
    default="0",
    help="model.stack_blocks: 1, 0 or 1,0 (every --remat with the first, the first with the rest)",
  )
  p.add_argument("--scan-impl", default="auto", help="model.scan.impl")
  p.add_argument("--iters", type=int, default=5, help="timed steps per row; 0: compile only")
  p.add_argument("--search", default="512:32,24,16,12,8;1024:8,6,4,2,1")
  p.add_argument("--feed", action="store_true", help="each recipe's step fed by its pipeline")
  p.add_argument("--breakdown", default="", help="image sides to split the step's time at")
  p.add_argument("--budget-s", type=float, default=1e9, help="start no new row after this")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--results", default="benchmarks/RESULTS.md")
  args = p.parse_args(argv)
  if args.tiny:
    args.variants, args.batch, args.iters = "S/2", 4, 2
    args.search = "64:4,2" if args.search else ""
  deadline = time.perf_counter() + args.budget_s
  jax.config.update("jax_enable_compilation_cache", False)  # compile s: a first run's
  peak = matmul_rate(256 if args.tiny else 8192)
  device = f"{jax.devices()[0].device_kind} ×{jax.device_count()}"
  steps = Steps()
  variants, remats = args.variants.split(","), args.remat.split(",")
  stacks = [s == "1" for s in args.stack.split(",")]
  # Every policy with the first layout, then (after the search and the feed, which --budget-s
  # may cut) the first policy with the other layouts.
  first = [(v, r, stacks[0]) for v in variants for r in remats]
  later = [(v, remats[0], s) for v in variants for s in stacks[1:]]
  table = step_header(peak)
  for combo in first:
    table.append(step_row(steps, args, peak, deadline, *combo))
    print(table[-1], flush=True)
  tables = [table]
  if args.search:
    tables.append(search_rows(steps, args, deadline))
  if args.feed:
    tables.append(input_feed.feed_rows(steps, args, deadline))
  for combo in later:
    table.append(step_row(steps, args, peak, deadline, *combo))
    print(table[-1], flush=True)
  text = "\n\n".join("\n".join(rows) for rows in tables)
  if args.breakdown:
    rates = dict(matmul=peak, copy=scan_bench.copy_bandwidth(2**20 if args.tiny else 2**29))
    splits = split_rows(steps, args, rates, deadline)
    text += (
      f"\n\nTime split of the training step (benchmarks/time_split.py; copy bandwidth "
      f"{rates['copy'] / 1e12:.2f} TB/s):\n\n" + time_split.split_table(splits, "ms/step")
    )
  print(text)
  header = (
    f"\n## Training step ({datetime.date.today()}, {device}, jax {jax.__version__})\n\n"
    f"`python -m benchmarks.train_step {' '.join(argv)}`\n\n"
  )
  if not args.tiny:
    results.append(args.results, header + text)


if __name__ == "__main__":
  main(sys.argv[1:])
