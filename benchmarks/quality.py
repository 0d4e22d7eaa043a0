"""FD-FMNIST: sample quality of a Fashion-MNIST model, offline (no Inception weights needed).

  .venv/bin/python benchmarks/quality.py                       # the real-data floor only
  .venv/bin/python benchmarks/quality.py --samples workdir/fmnist/samples.npz   # + a model's
  .venv/bin/python benchmarks/quality.py --train fmnist,dim-S/2,dit-S/2 --steps 2000  # train too

--train trains each named recipe with `python -m dim_jax.main` (configs/fashion_mnist.py, with the
backbone swapped for dim-S/2 and dit-S/2 so that DiM and DiT are compared at the same steps, batch
and sampler), samples --num_samples images from its EMA weights and scores them. Each run's
workdir is kept under --workdir_root, so a second call resumes or only re-scores.

The classifier (dim_jax/fmnist_classifier.py) is trained once on the 60 000 training images and
cached in --cache_dir (about 3 minutes on 2 CPU cores). Its penultimate features give the Fréchet
distance "FD-FMNIST" (plus precision / recall and a 10-class Inception Score, all through
dim_jax.eval_metrics). Reference: the first half of the test set (5 000 images). Floor: the second
half against it, i.e. what a perfect generator scores with 5 000 samples. A model's samples
(uint8 or [-1, 1], (N, 28 or 32, 28 or 32, 1), an .npz with `images` as sample.py writes it, or
ADM's `arr_0`) are scored against the same reference, the first 5 000 of them, so that the
sample-size bias matches the floor's. Samples come from a model trained with
configs/fashion_mnist.py (its docstring has the command).
"""

import argparse
import datetime
import glob
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from dim_jax import eval_metrics, fmnist_classifier  # noqa: E402
from dim_jax.data import fashion_mnist  # noqa: E402

HALF = 5000  # images per side: the test set's halves
BATCH = 500
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --train recipes: configs/fashion_mnist.py plus these overrides.
RECIPES = {
  "fmnist": [],  # the recipe as written (a DiM of width 256, depth 13)
  "dim-S/2": ["--config.model.variant=S/2"],
  "dit-S/2": ["--config.model.name=dit", "--config.model.variant=S/2"],
}


def batches(images: np.ndarray):
  return (images[i : i + BATCH] for i in range(0, len(images), BATCH))


def real_test_halves(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(reference half, floor half) uint8 (5000, 28, 28, 1) each, and all 10 000 test labels."""
  test = fashion_mnist.FashionMnistSource(data_dir, "test", fmnist_classifier.IMAGE_SIZE)
  images = test.images[..., None]  # (10000, 28, 28, 1): the raw images, unpadded
  return images[:HALF], images[HALF : 2 * HALF], test.labels


def score_generated(images: np.ndarray, feature_fn, ref: eval_metrics.ReferenceStats) -> dict:
  """Generated images (N, 28 or 32, 28 or 32, 1), uint8 or [-1, 1] -> FD-FMNIST and friends.

  The first 5 000 are scored (fewer if fewer are given: FD then carries a larger sample-size bias
  than the floor; "num_samples" says how many).
  """
  images = np.asarray(images)[:HALF]
  result = eval_metrics.evaluate_samples(batches(images), feature_fn, ref)
  return {("fd_fmnist" if k == "fid" else k): v for k, v in result.items()}


def read_samples(path: str) -> np.ndarray:
  with np.load(path) as data:
    for key in ("images", "arr_0"):
      if key in data:
        return data[key]
  raise ValueError(f"--samples={path!r} holds {sorted(data.keys())}: give an .npz with `images`.")


def latest_step(workdir: str) -> int:
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  return max(steps)


def train_and_sample(recipe: str, args, steps: int, seconds: float) -> dict:
  """Trains `recipe` for `steps` (0: the recipe's) or until `seconds` have passed (then SIGTERM:
  the run saves a checkpoint and exits), resuming if its workdir has a checkpoint; samples its
  EMA weights. Returns the .npz path, the steps trained and both wall times (s)."""
  if recipe not in RECIPES:
    raise SystemExit(f"--train: unknown recipe {recipe!r}; use some of {sorted(RECIPES)}.")
  workdir = os.path.join(args.workdir_root, recipe.replace("/", "_"))
  base = [sys.executable, "-m", "dim_jax.main", "--config=configs/fashion_mnist.py"]
  base += [f"--workdir={workdir}", f"--config.data.data_dir={args.data_dir}", *RECIPES[recipe]]
  base += [f"--config.model.dtype={args.dtype}", f"--config.sample.steps={args.sample_steps}"]
  base += [f"--config.sample.batch_size={args.sample_batch}"]
  if steps:
    base.append(f"--config.train.num_steps={steps}")
  if args.batch_size:
    base.append(f"--config.train.batch_size={args.batch_size}")

  start = time.perf_counter()
  print("+", " ".join(base), flush=True)
  training = subprocess.Popen(base + ["--config.sample.num_images=0"], cwd=REPO)
  try:
    training.wait(timeout=seconds or None)
  except subprocess.TimeoutExpired:
    training.send_signal(signal.SIGTERM)  # the preemption path: save, then exit cleanly
    training.wait()
  if training.returncode:
    raise SystemExit(f"training {recipe} failed with exit status {training.returncode}.")
  train_s = time.perf_counter() - start

  start = time.perf_counter()
  subprocess.run(base + ["--mode=sample", f"--num_images={args.num_samples}"], cwd=REPO, check=True)
  sample_s = time.perf_counter() - start
  npz = max(glob.glob(os.path.join(workdir, "sample_*.npz")), key=os.path.getmtime)
  return dict(npz=npz, steps=latest_step(workdir), train_s=train_s, sample_s=sample_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=fashion_mnist.DEFAULT_DIR)
  parser.add_argument("--cache_dir", default="workdir/quality", help="the classifier's cache")
  parser.add_argument("--samples", default=None, help=".npz of generated images to score")
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--no-append", action="store_true")
  parser.add_argument("--train", default="", help=f"comma-separated recipes of {sorted(RECIPES)}")
  parser.add_argument("--workdir_root", default="workdir/quality_runs")
  parser.add_argument("--steps", type=int, default=0, help="training steps (0: the recipe's)")
  parser.add_argument(
    "--train_seconds",
    type=float,
    default=0,
    help="stop the first recipe after this long (it saves a checkpoint); the others then train "
    "as many steps as it reached",
  )
  parser.add_argument("--batch_size", type=int, default=0, help="global batch (0: the recipe's)")
  parser.add_argument("--dtype", default="float32", help="compute dtype of the trained models")
  parser.add_argument("--num_samples", type=int, default=HALF, help="images sampled per recipe")
  parser.add_argument("--sample_steps", type=int, default=50)
  parser.add_argument("--sample_batch", type=int, default=500)
  args = parser.parse_args()

  trained, steps, seconds = [], args.steps, args.train_seconds
  for recipe in filter(None, args.train.split(",")):
    run = train_and_sample(recipe, args, steps, seconds)
    trained.append((recipe, run))
    steps, seconds = run["steps"], 0  # the next recipes: as many steps as this one
  start = time.perf_counter()
  classifier = fmnist_classifier.load_or_train(args.cache_dir, args.data_dir)
  train_s = time.perf_counter() - start
  feature_fn = fmnist_classifier.make_feature_fn(classifier)
  ref_images, floor_images, labels = real_test_halves(args.data_dir)
  test_images = np.concatenate([ref_images, floor_images])
  accuracy = fmnist_classifier.accuracy(classifier, test_images, labels)

  start = time.perf_counter()
  ref = eval_metrics.compute_reference_stats(batches(ref_images), feature_fn, manifold_size=HALF)
  floor = score_generated(floor_images, feature_fn, ref)
  floor_s = time.perf_counter() - start

  rows = [
    ("classifier test accuracy (10 000 images)", f"{accuracy:.4f}", "1 (perfect)", accuracy),
    ("FD-FMNIST floor: test half vs half (5 000 / 5 000)", f"{floor['fd_fmnist']:.4f}", "", None),
    (
      "precision / recall floor (k=3)",
      f"{floor['precision']:.3f} / {floor['recall']:.3f}",
      "",
      None,
    ),
  ]
  scored = [(args.samples, "")] if args.samples else []
  scored += [
    (
      run["npz"],
      f"{recipe}, {run['steps']} steps in {run['train_s']:.0f} s, "
      f"sampled in {run['sample_s']:.0f} s: ",
    )
    for recipe, run in trained
  ]
  for path, label in scored:
    model = score_generated(read_samples(path), feature_fn, ref)
    rows += [
      (
        f"{label}FD-FMNIST of {path} ({model['num_samples']} samples)",
        f"{model['fd_fmnist']:.4f}",
        f"floor {floor['fd_fmnist']:.4f}",
        model["fd_fmnist"] / floor["fd_fmnist"],
      ),
      (
        "precision / recall of the samples",
        f"{model['precision']:.3f} / {model['recall']:.3f}",
        f"floor {floor['precision']:.3f} / {floor['recall']:.3f}",
        None,
      ),  # fmt: skip
      (
        "10-class Inception Score of the samples",
        f"{model['inception_score']:.3f}",
        f"real {floor['inception_score']:.3f}",
        model["inception_score"] / floor["inception_score"],
      ),  # fmt: skip
    ]
  lines = ["| figure | value | compared with | ratio |", "| --- | --- | --- | --- |"]
  for name, value, bound, ratio in rows:
    lines.append(f"| {name} | {value} | {bound} | {'' if ratio is None else f'{ratio:.3f}'} |")
  table = "\n".join(lines)
  print(table)
  print(f"classifier: {train_s:.0f} s (train or load); reference + floor: {floor_s:.0f} s")

  if not args.no_append:
    cpu = platform.processor() or platform.machine()
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    entry = (
      f"\n## Sample quality (FD-FMNIST), {datetime.date.today().isoformat()}\n\n"
      f"Device: {cpu}, {os.cpu_count()} cores. Command: `{command.strip()}`. Classifier "
      f"{os.path.basename(fmnist_classifier.cache_path(args.cache_dir))} ({train_s:.0f} s to "
      f"train or load); reference and floor {floor_s:.0f} s.\n\n{table}\n"
    )
    results.append(args.results, entry)


if __name__ == "__main__":
  main()
