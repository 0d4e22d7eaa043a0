"""SD KL-f8 VAE encode and decode throughput (images/s), set against a FLOP roofline.

Encode is what `--mode=extract_latents` pays per image and flip (images -> posterior moments);
decode is what sampling and FID evaluation pay per image (scaled latents -> clipped images). Both
run jitted (`vae.make_moments_fn` / `vae.make_decode_fn`) on one device, with random weights at
the real SD widths (speed does not depend on the values; no weights exist offline). For each
size the table gives images/s (median of timed calls after compilation and a warm-up call),
the analytic FLOPs per image (convs and the mid-block attention; norms and activations apart),
the images/s those FLOPs allow at the bf16 matmul rate measured in the same run, and the ratio.
If a batch does not fit, it is halved until it does.

Needs only jax, flax and numpy. From the repository root:
  python -m benchmarks.vae                                   # GPU: 256² and 512², bf16
  python -m benchmarks.vae --sizes 256 --batch 64            # one size, a given batch
  python -m benchmarks.vae --tiny                            # CPU smoke run (32², batch 1)

The table is printed and appended to --results (benchmarks/RESULTS.md; nowhere in --tiny mode
unless --results is given).
"""

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import results
from dim_jax.models.vae import SD_KL_F8, VAEConfig, make_decode_fn, make_moments_fn, random_vae

DEFAULT_BATCH = {256: 128, 512: 32}  # enough work per call to fill an H200; halved if it won't fit


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sizes", default="256,512", help="image sides, multiples of 8")
  p.add_argument("--batch", type=int, default=None, help="batch for every size (default per size)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--iters", type=int, default=10, help="timed calls per figure")
  p.add_argument("--matmul-size", type=int, default=8192, help="n of the n³ bf16 matmul")
  p.add_argument("--tiny", action="store_true", help="CPU smoke run: 32², batch 1, 2 iters")
  p.add_argument("--results", default=None, help="markdown file to append the table to")
  args = p.parse_args(argv)
  args.sizes = [int(s) for s in args.sizes.split(",")]
  if args.tiny:
    args.sizes, args.batch, args.iters, args.matmul_size = [32], args.batch or 1, 2, 256
  bad = [s for s in args.sizes if s % SD_KL_F8.downsample_factor or s <= 0]
  if bad:
    p.error(f"--sizes {bad}: each must be a positive multiple of {SD_KL_F8.downsample_factor}")
  if args.results is None and not args.tiny:
    args.results = "benchmarks/RESULTS.md"
  return args


# --- analytic FLOPs (2 per multiply-add) ------------------------------------------------------


def _conv(h, w, cin, cout, k):
  return 2 * h * w * cin * cout * k * k  # at the output resolution h x w


def _resnet(h, w, cin, cout):
  return (
    _conv(h, w, cin, cout, 3)
    + _conv(h, w, cout, cout, 3)
    + (cin != cout) * _conv(h, w, cin, cout, 1)
  )


def _mid(h, w, c):
  tokens = h * w
  attention = 4 * 2 * tokens * c * c + 2 * 2 * tokens * tokens * c  # q, k, v, out; q k^T and p v
  return 2 * _resnet(h, w, c, c) + attention


def vae_flops(cfg: VAEConfig, height: int, width: int) -> tuple[int, int]:
  """(encode, decode) FLOPs for one height x width image."""
  widths, latent, f = cfg.block_out_channels, cfg.latent_channels, cfg.downsample_factor
  enc, h, w, cin = _conv(height, width, cfg.in_channels, widths[0], 3), height, width, widths[0]
  for i, c in enumerate(widths):
    for j in range(cfg.layers_per_block):
      enc += _resnet(h, w, cin if j == 0 else c, c)
    cin = c
    if i < len(widths) - 1:
      h, w = h // 2, w // 2
      enc += _conv(h, w, c, c, 3)
  enc += _mid(h, w, widths[-1]) + _conv(h, w, widths[-1], 2 * latent, 3)
  enc += _conv(h, w, 2 * latent, 2 * latent, 1)

  h, w = height // f, width // f
  dec = _conv(h, w, latent, latent, 1) + _conv(h, w, latent, widths[-1], 3) + _mid(h, w, widths[-1])
  cin = widths[-1]
  for i, c in enumerate(widths[::-1]):
    for j in range(cfg.layers_per_block + 1):
      dec += _resnet(h, w, cin if j == 0 else c, c)
    cin = c
    if i < len(widths) - 1:
      h, w = 2 * h, 2 * w
      dec += _conv(h, w, c, c, 3)
  dec += _conv(h, w, widths[0], cfg.in_channels, 3)
  return enc, dec


# --- timing -----------------------------------------------------------------------------------


def timed_calls(fn, x, iters: int) -> list[float]:
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return times


def matmul_rate(n: int) -> float:
  """Measured bf16 FLOP/s of an n x n x n matmul."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
  fn = jax.jit(jnp.matmul)
  jax.block_until_ready(fn(a, b))
  return 2 * n**3 / statistics.median(timed_calls(lambda a: fn(a, b), a, 10))


def _out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def measure(fn, shape, iters: int) -> dict:
  """Compiles, warms up and times fn on a random batch of `shape`; halves the batch on OOM."""
  while True:
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    try:
      start = time.perf_counter()
      jax.block_until_ready(fn(x))  # compile + first call
      compile_s = time.perf_counter() - start
      jax.block_until_ready(fn(x))
      seconds = statistics.median(timed_calls(fn, x, iters))
      return dict(batch=shape[0], seconds=seconds, compile_s=compile_s)
    except Exception as error:  # XlaRuntimeError's class moved between jax releases
      if not _out_of_memory(error) or shape[0] == 1:
        raise
      shape = (shape[0] // 2, *shape[1:])
      print(f"out of memory: retrying with batch {shape[0]}")


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def run(args, rate: float) -> list[dict]:
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  vae = random_vae(SD_KL_F8, dtype=dtype)
  encode, decode = make_moments_fn(vae), make_decode_fn(vae)
  rows = []
  for size in args.sizes:
    batch = args.batch or DEFAULT_BATCH.get(size, max(1, 128 * 256**2 // size**2))
    latent = size // SD_KL_F8.downsample_factor
    flops = dict(zip(("encode", "decode"), vae_flops(SD_KL_F8, size, size), strict=True))
    shapes = {"encode": (batch, size, size, 3), "decode": (batch, latent, latent, 4)}
    for name, fn in (("encode", encode), ("decode", decode)):
      row = measure(fn, shapes[name], args.iters)
      images_per_s = row["batch"] / row["seconds"]
      bound = rate / flops[name]
      rows.append(
        dict(
          figure=f"{name} {size}²",
          images_per_s=images_per_s,
          bound=bound,
          ratio=images_per_s / bound,
          gflop=flops[name] / 1e9,
          peak_gib=peak_memory_gib(),
          **row,
        )
      )
      print(f"{rows[-1]['figure']}: {images_per_s:.1f} images/s (batch {row['batch']})", flush=True)
  return rows


def table(rows: list[dict]) -> str:
  lines = [
    "| figure | images/s | bound: FLOPs / matmul rate (images/s) | ratio | GFLOP/image | batch | "
    "compile s | peak GiB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    lines.append(
      f"| {r['figure']} | {r['images_per_s']:.1f} | {r['bound']:.1f} | {r['ratio']:.2f} | "
      f"{r['gflop']:.0f} | {r['batch']} | {r['compile_s']:.1f} | {peak} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  dev = jax.devices()[0]
  device = f"{dev.device_kind} ({dev.platform}, 1 of {jax.device_count()})"
  rate = matmul_rate(args.matmul_size)
  print(f"{device}: bf16 matmul {args.matmul_size}³ at {rate / 1e12:.2f} TFLOP/s")
  rows = run(args, rate)
  report = (
    f"\n## SD-VAE encode / decode ({datetime.date.today()})\n\n"
    f"- device: {device}; jax {jax.__version__}; bf16 matmul {args.matmul_size}³: "
    f"{rate / 1e12:.1f} TFLOP/s (the roofline rate)\n"
    f"- command: `python -m benchmarks.vae {' '.join(argv)}`; {args.dtype}, random weights at the "
    f"SD widths; encode = images -> moments, decode = scaled latents -> clipped images; peak GiB "
    f"is cumulative over the run\n\n" + table(rows)
  )
  print(report)
  if args.results:
    results.append(args.results, report)


if __name__ == "__main__":
  main()
