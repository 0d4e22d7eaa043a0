"""How many CPU cores feed one accelerator: input-pipeline images/s on one core.

  .venv/bin/python benchmarks/input_pipeline.py            # prints the table, appends RESULTS.md

Measured on one core (one thread, no grain workers), so the figures are per core:
  - JPEG decode + ADM centre crop to 256² (+ flip, scale), on synthetic ImageNet-sized JPEGs
    (500x375 and similar, quality 90), alone and through the whole grain pipeline;
  - latent reading through the grain pipeline: array_record posterior moments -> scaled sample,
    at 256² (32x32x4 latents) and 512² (64x64x4), stored as float32 and float16.
The bound is the rate one H200 trains at (DESIGN.md: DiT-XL/2, 459 img/s at 256², 101 at 512²;
DiM is no faster), so bound / figure is the number of cores one accelerator needs.
"""

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from dim_jax import data  # noqa: E402
from dim_jax.data import decoded, preprocess  # noqa: E402
from dim_jax.tools.extract_latents import extract_latents  # noqa: E402

ACCELERATOR_RATE = {256: 459.0, 512: 101.0}  # img/s, one H200 training DiT-XL/2 (DESIGN.md)
JPEG_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480)]


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """Smooth colour fields plus texture noise: compresses like a photo (about 1 bit per pixel)."""
  coarse = rng.uniform(0, 255, size=(height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
  texture = rng.normal(0, 12, size=(height, width, 3))
  return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def write_jpegs(folder: str, count: int, rng: np.random.Generator) -> float:
  """Writes `count` JPEGs into folder/photos/; returns their mean size in bytes."""
  os.makedirs(os.path.join(folder, "photos"))
  sizes = []
  for i in range(count):
    width, height = JPEG_SIZES[i % len(JPEG_SIZES)]
    path = os.path.join(folder, "photos", f"{i:05d}.jpg")
    Image.fromarray(synthetic_photo(rng, width, height)).save(path, quality=90)
    sizes.append(os.path.getsize(path))
  return float(np.mean(sizes))


def rate(fn, count: int, repeats: int = 3) -> float:
  """Best of `repeats` runs of fn() (which handles `count` images), in images/s."""
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return count / best


def jpeg_figures(root: str, count: int, rng) -> list[tuple[str, float, float]]:
  mean_bytes = write_jpegs(root, count, rng)
  encoded = []
  for name in sorted(os.listdir(os.path.join(root, "photos"))):
    with open(os.path.join(root, "photos", name), "rb") as f:
      encoded.append(f.read())

  def decode_crop():
    for blob in encoded:
      image, _ = decoded.decode_rgb(blob)
      preprocess.to_unit_range(preprocess.adm_center_crop(image, 256)[:, ::-1])

  cfg = dict(name="image_folder", data_dir=root, image_size=256, read_threads=0, worker_count=0)
  batch_size = 32
  iterator = data.create_train_iterator(cfg, batch_size=batch_size, seed=0)
  next(iterator)

  def pipeline():
    for _ in range(count // batch_size):
      next(iterator)

  label = f"(mean {mean_bytes / 1024:.0f} KiB)"
  return [
    (f"JPEG decode + ADM crop 256², in memory {label}", rate(decode_crop, count), 256),
    (f"  same through the grain pipeline, from files {label}", rate(pipeline, count), 256),
  ]


def latent_figures(root: str, count: int, rng) -> list[tuple[str, float, float]]:
  figures = []
  for image_size, side in ((256, 32), (512, 64)):
    for dtype in ("float32", "float16"):
      folder = os.path.join(root, f"latents{image_size}_{dtype}")

      def encoder(images, side=side):  # posterior moments of the right shape, any values
        b = images.shape[0]
        mean = rng.normal(size=(b, side, side, 4)).astype(np.float32)
        return mean, np.full_like(mean, -3.0)

      source_cfg = dict(name="shapes", image_size=8, num_examples=count, worker_count=0)
      extract_latents(encoder, source_cfg, folder, batch_size=64, dtype=dtype)
      cfg = dict(name="latents", data_dir=folder, read_threads=0, worker_count=0)
      batch_size = 64
      iterator = data.create_train_iterator(cfg, batch_size=batch_size, seed=0)
      next(iterator)

      def read(iterator=iterator, batch_size=batch_size):
        for _ in range(count // batch_size):
          next(iterator)

      kib = 2 * 2 * side * side * 4 * np.dtype(dtype).itemsize / 1024
      name = f"latent read + sample {side}x{side}x4 ({image_size}²), {dtype} ({kib:.0f} KiB/img)"
      figures.append((name, rate(read, count), image_size))
  return figures


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-jpegs", type=int, default=256)
  parser.add_argument("--num-latents", type=int, default=1024)
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as root:
    figures = jpeg_figures(os.path.join(root, "jpeg"), args.num_jpegs, rng)
    figures += latent_figures(root, args.num_latents, rng)

  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = models[0] if models else cpu
  load = os.getloadavg()[0]
  header = "| figure (one CPU core) | images/s | bound: one H200 trains at | cores per H200 |"
  lines = [header, "| --- | --- | --- | --- |"]
  for name, value, image_size in figures:
    bound = ACCELERATOR_RATE[image_size]
    lines.append(f"| {name} | {value:.0f} | {bound:.0f} img/s | {math.ceil(bound / value)} |")
  table = "\n".join(lines)
  print(table)

  if not args.no_append:
    command = "python benchmarks/input_pipeline.py " + " ".join(sys.argv[1:])
    entry = (
      f"\n## Input pipeline, {datetime.date.today().isoformat()}\n\n"
      f"Device: {cpu}, {os.cpu_count()} cores (load average {load:.1f} at the end; "
      f"shared machine). Command: `{command.strip()}`.\n\n{table}\n"
    )
    results.append(args.results, entry)


if __name__ == "__main__":
  main()
