"""Sampling-forward throughput of DiM and DiT from 256² to 1536², set against a FLOP roofline.

One backbone forward per image is what a sampler pays per step (and per CFG branch). Every model
runs in bf16 on SD-VAE latents (image side / 8, 4 channels), patch 2, 1000 classes, one device.
For each model and resolution the table gives images/s (median of timed calls after compilation
and a warm-up call), the analytic forward FLOPs per image (`dim_jax/models/flops.py`: dense =
matmuls + attention; scan and depth-wise convs apart), and the time those dense FLOPs take at the
bf16 matmul rate measured in the same run. A second table gives DiM-H/2 over DiT-XL/2 at each
resolution, next to the ratio their FLOP counts allow and the project's goals.

Each model is built once, with the 256² position table; DiM bilinearly resizes it at other sizes
(as the official upsampling does), DiT computes its sin-cos embedding for the grid.

Usage, from the repository root:
  python -m benchmarks.throughput --out benchmarks                # GPU: the full table and plot
  python -m benchmarks.throughput --models dim-H,dit-XL --out benchmarks
  python -m benchmarks.throughput --tiny --out /tmp/throughput    # CPU smoke run, < 1 minute

Tables go to stdout and are appended to --results (benchmarks/RESULTS.md; in --tiny mode
<out>/RESULTS.md); <out>/throughput.png (needs matplotlib) and <out>/throughput.json hold the plot
and the raw rows.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from benchmarks import results, time_split
from benchmarks import scan as scan_bench
from dim_jax.configs import common
from dim_jax.models import create_model, dim_preset
from dim_jax.models.dit import dit_preset
from dim_jax.models.flops import dim_flops, dim_sequence_length, dit_flops

MODELS = {
  "dim-H": ("dim", "H/2"),
  "dit-XL": ("dit", "XL/2"),
  "dim-L": ("dim", "L/2"),
  "dit-L": ("dit", "L/2"),
  "dim-S": ("dim", "S/2"),
  "dit-B": ("dit", "B/2"),
  "dit-S": ("dit", "S/2"),
}
HEADLINE = ("dim-H", "dit-XL")  # run first, resolution by resolution, so a time budget keeps them
GOALS = {256: 0.38, 512: 0.50, 1024: 0.80, 1536: 1.3}  # DiM-H/2 / DiT-XL/2 images/s, the goals
LATENT_DOWNSAMPLE, LATENT_CHANNELS, NUM_CLASSES, STORED_LATENT = 8, 4, 1000, 32
TINY_ARCH = {
  "dim": dict(width=32, depth=3, patch_size=2),
  "dit": dict(width=32, depth=2, num_heads=2, patch_size=2),
}


def ablated_graph(net, ablation: str) -> nnx.GraphDef:
  """DiM's graph without its scan or also its token permutations (`time_split.ablated`); the
  parameters are the same, so `net.state` runs it."""
  cfg = time_split.ablated(net.cfg, ablation)
  return nnx.split(nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0))))[0]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--models",
    default=None,
    help=f"comma list of {list(MODELS)}; default all (--tiny: DiM-H, DiT-XL)",
  )
  p.add_argument("--resolutions", default="256,512,1024,1536", help="image sides, pixels")
  p.add_argument("--batch", type=int, default=0, help="fixed batch; 0: from --tokens-per-batch")
  p.add_argument(
    "--tokens-per-batch", type=int, default=32768, help="auto batch = this // image tokens"
  )
  p.add_argument("--iters", type=int, default=5, help="timed calls per model and resolution")
  p.add_argument("--scan-impl", default="auto", help="DiM model.scan.impl")
  p.add_argument("--attention-impl", default="auto", help="DiT model.attention_impl")
  p.add_argument("--matmul-size", type=int, default=8192, help="n of the n³ bf16 matmul")
  p.add_argument("--budget-s", type=float, default=270.0, help="start no new run after this")
  p.add_argument("--out", default="benchmarks", help="folder for the plot and raw rows")
  p.add_argument("--results", default=None, help="markdown file the tables are appended to")
  p.add_argument(
    "--breakdown", action="store_true", help="also time DiM without its scan / permutations"
  )
  p.add_argument("--tiny", action="store_true", help="tiny models and sizes: CPU smoke run")
  args = p.parse_args(argv)
  args.models = (args.models or ",".join(HEADLINE if args.tiny else MODELS)).split(",")
  unknown = [m for m in args.models if m not in MODELS]
  if unknown:
    p.error(f"--models: unknown {unknown}; use names from {list(MODELS)}")
  args.resolutions = [int(r) for r in args.resolutions.split(",")]
  if args.tiny:
    args.resolutions = [r // 4 for r in args.resolutions[:2]]  # 64² and 128² images
    args.batch, args.iters, args.matmul_size = args.batch or 2, 2, 256
  bad = [r for r in args.resolutions if r % (2 * LATENT_DOWNSAMPLE)]
  if bad:
    p.error(f"--resolutions {bad}: each must be a multiple of {2 * LATENT_DOWNSAMPLE}")
  default_results = pathlib.Path(args.out) / "RESULTS.md" if args.tiny else "benchmarks/RESULTS.md"
  args.results = pathlib.Path(args.results or default_results)
  return args


def timed_calls(fn, *args, iters: int) -> list[float]:
  """Seconds of each of `iters` calls, each waited for with block_until_ready."""
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def matmul_rate(n: int, iters: int) -> float:
  """Measured bf16 FLOP/s of an n x n x n matmul."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
  fn = jax.jit(jnp.matmul)
  jax.block_until_ready(fn(a, b))
  return 2 * n**3 / statistics.median(timed_calls(fn, a, b, iters=max(iters, 10)))


def model_config(family: str, arch: dict, args) -> ml_collections.ConfigDict:
  """The `model` config section of one benchmarked backbone (an unlocked copy of the defaults)."""
  cfg = ml_collections.ConfigDict(common.base_config().model.to_dict())
  fields = dict(
    name=family,
    variant=None,
    in_channels=LATENT_CHANNELS,
    input_size=STORED_LATENT,
    num_classes=NUM_CLASSES,
    dtype="bfloat16",
    scan=dict(impl=args.scan_impl),
    attention_impl=args.attention_impl,
    num_heads=arch.get("num_heads", 1),
  )
  cfg.update({**fields, **arch})
  return cfg


def flops_per_image(family: str, arch: dict, grid: int, cfg):
  common_args = dict(
    width=arch["width"],
    depth=arch["depth"],
    grid=(grid, grid),
    patch_size=arch["patch_size"],
    in_channels=LATENT_CHANNELS,
  )
  if family == "dim":
    return dim_flops(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, **common_args)
  return dit_flops(**common_args)


def benchmark_one(forward, state, latent: int, batch: int, iters: int) -> dict:
  """Compiles and times forward(state, x, t, y) at one batch size; raises on OOM."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, latent, latent, LATENT_CHANNELS), jnp.float32)
  t = jax.random.uniform(keys[1], (batch,), jnp.float32, 0, 1000)
  y = jax.random.randint(keys[2], (batch,), 0, NUM_CLASSES)
  start = time.perf_counter()
  compiled = forward.lower(state, x, t, y).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(state, x, t, y))  # warm-up
  seconds = statistics.median(timed_calls(compiled, state, x, t, y, iters=iters))
  return dict(batch=batch, compile_s=compile_s, img_s=batch / seconds)


def measure(forward, state, latent: int, batch: int, iters: int) -> dict:
  """`benchmark_one`, halving the batch on out-of-memory; other failures become a note."""
  while True:
    try:
      return benchmark_one(forward, state, latent, batch, iters)
    except Exception as err:  # XLA reports OOM as a runtime error with this status
      if "RESOURCE_EXHAUSTED" not in str(err) or batch == 1:
        return dict(note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
      batch //= 2


@dataclasses.dataclass
class Backbone:
  family: str
  arch: dict
  cfg: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  state: nnx.State


def build(name: str, args) -> Backbone:
  """Initialises one benchmarked model (once; every resolution reuses its parameters)."""
  family, variant = MODELS[name]
  preset = dim_preset if family == "dim" else dit_preset
  arch = TINY_ARCH[family] if args.tiny else preset(variant)
  cfg = model_config(family, arch, args)
  model = create_model(cfg, nnx.Rngs(0))
  return Backbone(family, arch, cfg, *nnx.split(model))


def run_resolution(name: str, net: Backbone, res: int, args, rate: float, deadline: float):
  """Rows for one model at one resolution (and, with --breakdown, for DiM's ablations)."""
  latent = res // LATENT_DOWNSAMPLE
  grid = latent // net.arch["patch_size"]
  flops = flops_per_image(net.family, net.arch, grid, net.cfg)
  tokens = dim_sequence_length((grid, grid)) if net.family == "dim" else grid * grid
  batch = args.batch or max(1, args.tokens_per_batch // (grid * grid))
  rows = []
  for ablation in time_split.ABLATIONS if args.breakdown and net.family == "dim" else [""]:
    graphdef = ablated_graph(net, ablation) if ablation else net.graphdef
    row = dict(model=name + ablation, res=res, tokens=tokens, flops=flops.dense)
    row.update(other_flops=flops.total - flops.dense, roofline_ms=1e3 * flops.dense / rate)
    if time.perf_counter() > deadline:
      rows.append({**row, "note": "skipped: --budget-s spent"})
      continue
    forward = jax.jit(lambda state, x, t, y, g=graphdef: nnx.merge(g, state)(x, t, y))
    row.update(measure(forward, net.state, latent, batch, args.iters))
    if "img_s" in row:
      row["ratio"] = (1e3 / row["img_s"]) / row["roofline_ms"]
    rows.append(row)
    result = f"{row['img_s']:.4g} img/s" if "img_s" in row else row["note"]
    print(f"  {row['model']} {res}²: {result}", flush=True)
  if args.breakdown and net.family == "dim" and all("img_s" in r for r in rows):
    rows[0]["split"] = forward_split(name, net, rows, grid, dict(matmul=rate, copy=args.copy_rate))
  return rows


def forward_split(name: str, net: Backbone, rows: list[dict], grid: int, rates: dict) -> dict:
  """The time split of one image's forward at one resolution (`time_split`), from its rows."""
  per_image = {r["model"].removeprefix(name): 1 / r["img_s"] for r in rows}
  batch, length = rows[0]["batch"], rows[0]["tokens"]
  shapes = time_split.matmul_shapes(net.arch, net.cfg, length, grid * grid)
  matmuls = time_split.matmul_seconds(shapes, batch, train=False) / batch
  return dict(
    label=f"{name} {rows[0]['res']}²",
    parts=time_split.split(per_image, matmuls),
    floors=time_split.floors(net.arch, net.cfg, 1, grid, rates, train=False),
    total=per_image[""],
  )


def run_all(args, rate: float, deadline: float) -> list[dict]:
  """The headline pair first, resolution by resolution, then the other models."""
  names = [m for m in MODELS if m in args.models]
  jobs = [(r, m) for r in args.resolutions for m in names if m in HEADLINE]
  jobs += [(r, m) for r in args.resolutions for m in names if m not in HEADLINE]
  nets, rows = {}, []
  for res, name in jobs:
    if name not in nets:
      nets[name] = build(name, args)
    rows += run_resolution(name, nets[name], res, args, rate, deadline)
  return rows


def results_table(rows: list[dict]) -> str:
  head = (
    "| model | image | tokens | batch | compile s | img/s | ms/img | dense GFLOP/img "
    "| scan+conv GFLOP/img | roofline ms/img | measured / roofline |\n" + "|---" * 11 + "|\n"
  )
  lines = []

  def order(r):
    base, _, ablation = r["model"].partition(" ")
    return r["res"], list(MODELS).index(base), len(ablation)

  for r in sorted(rows, key=order):
    if "img_s" not in r:
      lines.append(f"| {r['model']} | {r['res']}² | {r['tokens']} | {r['note']} |" + " |" * 7)
      continue
    lines.append(
      f"| {r['model']} | {r['res']}² | {r['tokens']} | {r['batch']} | {r['compile_s']:.1f} "
      f"| {r['img_s']:.4g} | {1e3 / r['img_s']:.4g} | {r['flops'] / 1e9:.4g} "
      f"| {r['other_flops'] / 1e9:.3g} | {r['roofline_ms']:.4g} | {r['ratio']:.2f} |"
    )
  return head + "\n".join(lines) + "\n"


def ratio_table(rows: list[dict]) -> str:
  """DiM-H / DiT-XL at each resolution: measured, what the dense FLOPs allow, the goal."""
  by_key = {(r["model"], r["res"]): r for r in rows}
  head = (
    "| image | DiM-H img/s | DiT-XL img/s | DiM-H / DiT-XL | FLOP bound (DiT-XL / DiM-H FLOPs) "
    "| measured / bound | goal | goal met |\n" + "|---" * 8 + "|\n"
  )
  lines = []
  for res in sorted({r["res"] for r in rows}):
    dim, dit = by_key.get((HEADLINE[0], res)), by_key.get((HEADLINE[1], res))
    if not (dim and dit and "img_s" in dim and "img_s" in dit):
      continue
    measured, bound = dim["img_s"] / dit["img_s"], dit["flops"] / dim["flops"]
    goal = GOALS.get(res)
    met = "n/a" if goal is None else ("yes" if measured >= goal else "no")
    lines.append(
      f"| {res}² | {dim['img_s']:.2f} | {dit['img_s']:.2f} | {measured:.3f} | {bound:.3f} "
      f"| {measured / bound:.2f} | {goal if goal is not None else '-'} | {met} |"
    )
  return head + "\n".join(lines) + "\n" if lines else ""


def plot(rows: list[dict], device: str, path: pathlib.Path) -> str:
  try:
    import matplotlib  # lazily: only the plot needs it
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
  except ImportError:
    return "matplotlib is not installed: plot skipped"
  fig, ax = plt.subplots(figsize=(7, 5))
  for name in MODELS:
    pts = sorted((r["res"], r["img_s"]) for r in rows if r["model"] == name and "img_s" in r)
    if pts:
      style = "-o" if name.startswith("dim") else "--s"
      (line,) = ax.plot(*zip(*pts, strict=True), style, label=name)
      if name in HEADLINE:  # the images/s its dense FLOPs allow at the measured matmul rate
        bound = sorted((r["res"], 1e3 / r["roofline_ms"]) for r in rows if r["model"] == name)
        ax.plot(*zip(*bound, strict=True), ":", color=line.get_color(), label=f"{name} roofline")
  ax.set(xscale="log", yscale="log", xlabel="image side (pixels)", ylabel="images / s")
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xticks(
    sorted({r["res"] for r in rows}), [str(r) for r in sorted({r["res"] for r in rows})]
  )
  ax.set_title(f"Sampling forward, bf16, {device}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return f"plot: {path}"


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  device = f"{dev.device_kind} ({dev.platform}, 1 of {jax.device_count()})"
  rate = matmul_rate(args.matmul_size, args.iters)
  print(f"{device}: bf16 matmul {args.matmul_size}³ at {rate / 1e12:.1f} TFLOP/s")
  args.copy_rate = scan_bench.copy_bandwidth(2**20 if args.tiny else 2**29)
  rows = run_all(args, rate, deadline=start + args.budget_s)
  splits = [r["split"] for r in rows if "split" in r]
  command = "python -m benchmarks.throughput " + " ".join(sys.argv[1:] if argv is None else argv)
  report = (
    f"\n## Throughput, DiM vs DiT sampling forward ({datetime.date.today()})\n\n"
    f"- device: {device}; jax {jax.__version__}; bf16 matmul {args.matmul_size}³: "
    f"{rate / 1e12:.1f} TFLOP/s (the roofline rate)\n"
    f"- command: `{command}`{' (tiny architectures)' if args.tiny else ''}\n"
    f"- model.scan.impl={args.scan_impl}, attention_impl={args.attention_impl}; latents /8, "
    f"4 channels, patch 2; wall time {time.perf_counter() - start:.0f} s\n\n"
    + results_table(rows)
    + ("\n" + ratio_table(rows) if ratio_table(rows) else "")
    + (
      f"\nTime split of one image's forward (benchmarks/time_split.py; copy bandwidth "
      f"{args.copy_rate / 1e12:.2f} TB/s):\n\n" + time_split.split_table(splits, "ms/img")
      if splits
      else ""
    )
  )
  print(report)
  print(plot(rows, device, out / "throughput.png"))
  (out / "throughput.json").write_text(
    json.dumps(dict(device=device, rate=rate, rows=rows), indent=1)
  )
  results.append(args.results, report)


if __name__ == "__main__":
  main()
