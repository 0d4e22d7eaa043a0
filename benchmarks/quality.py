"""Sample quality against training steps and against wall-clock seconds (FD-FMNIST), DiM and DiT.

  python benchmarks/quality.py --data_dir .data/fashion-mnist --recipes fmnist --seconds 540
  python benchmarks/quality.py --data_dir .data/fashion-mnist --recipes dim-S/2,dit-S/2 \\
      --seconds 270 --eval_every 400

Each recipe is configs/fashion_mnist.py, its backbone optionally swapped (`RECIPES`), trained in a
process of its own for --seconds of training wall time: from the process start, compilation
included, evaluations excluded (then SIGTERM: the run saves a checkpoint and exits). The training
loop evaluates its EMA weights every --eval_every steps (`dim_jax/evaluators.py`: FD-FMNIST of
--num_samples samples against the first half of the test split, in the features of a classifier of
Fashion-MNIST). A row's seconds are training wall time: from the process start to the evaluation,
less the time spent in evaluations. Beside each FD stand the floor (held-out test images against the
reference, as many as the samples) and the noise level (Gaussian-noise images). The table is
appended to RESULTS.md and the curves (FD against steps and against seconds) drawn to --plot. Each
finished run is kept in its workdir (quality_run.json); --reuse reads it instead of training again,
so that recipes can be trained in separate calls and tabled and drawn together:

  python benchmarks/quality.py --recipes dim-S/2 --seconds 300 --no-append ...
  python benchmarks/quality.py --recipes dim-S/2,dit-S/2 --seconds 300 --reuse ...
"""

import argparse
import datetime
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/fashion_mnist.py plus these overrides.
RECIPES = {
  "fmnist": [],  # the recipe as written (a DiM of width 256, depth 13)
  "dim-S/2": ["--config.model.variant=S/2"],
  "dit-S/2": ["--config.model.name=dit", "--config.model.variant=S/2"],
}


def read_evaluations(workdir: str) -> list[dict]:
  """The eval_<step>.json files that the training loop wrote, by step (one being written: later)."""
  evaluations = []
  for path in glob.glob(os.path.join(workdir, "eval_*.json")):
    with open(path) as f:
      try:
        evaluations.append(json.load(f))
      except json.JSONDecodeError:
        continue
  return sorted(evaluations, key=lambda e: e["step"])


def train_with_evaluations(recipe: str, args) -> dict:
  """Trains `recipe` for args.seconds from the process start; returns its evaluations, read from
  the eval_<step>.json files of its workdir, with their training wall time."""
  if recipe not in RECIPES:
    raise SystemExit(f"--recipes: unknown recipe {recipe!r}; use some of {sorted(RECIPES)}.")
  workdir = os.path.join(args.workdir_root, recipe.replace("/", "_"))
  finished = os.path.join(workdir, "quality_run.json")
  if args.reuse and os.path.exists(finished):
    with open(finished) as f:
      print(f"{recipe}: the run in {workdir}", flush=True)
      return json.load(f)
  if os.path.exists(workdir):
    raise SystemExit(f"{workdir} exists: the wall-clock figures need a fresh run; remove it.")
  command = [sys.executable, "-m", "dim_jax.main", "--config=configs/fashion_mnist.py"]
  command += [f"--workdir={workdir}", f"--config.data.data_dir={args.data_dir}", *RECIPES[recipe]]
  command += [f"--config.model.dtype={args.dtype}", f"--config.eval.every={args.eval_every}"]
  command += [f"--config.eval.num_samples={args.num_samples}"]
  command += [f"--config.eval.cache_dir={args.cache_dir}", "--config.sample.num_images=0"]
  command += [f"--config.sample.batch_size={args.sample_batch}", *args.extra]
  if args.steps:
    command.append(f"--config.train.num_steps={args.steps}")
  print("+", " ".join(command), flush=True)

  start = time.time()
  process = subprocess.Popen(command, cwd=REPO)
  # The budget is training wall time: the deadline moves by the time spent evaluating so far.
  while process.poll() is None:
    evaluations = read_evaluations(workdir)
    spent = evaluations[-1]["eval_seconds"] + evaluations[-1]["seconds"] if evaluations else 0
    if time.time() > start + args.seconds + spent:
      process.send_signal(signal.SIGTERM)  # the preemption path: save, then exit cleanly
      process.wait()
      break
    time.sleep(1)
  if process.returncode:
    raise SystemExit(f"training {recipe} failed with exit status {process.returncode}.")

  evaluations = read_evaluations(workdir)
  if not evaluations:
    raise SystemExit(f"{recipe} made no evaluation in {args.seconds} s: lower --eval_every.")
  for e in evaluations:  # wall time from the process start, less the evaluations before this one
    e["wall_seconds"] = e["time"] - start - e["eval_seconds"]
  run = dict(recipe=recipe, evaluations=evaluations, baselines=evaluations[0]["baselines"])
  with open(finished, "w") as f:
    json.dump(run, f)
  return run


def table(runs: list[dict]) -> str:
  lines = [
    "| recipe | step | training wall s | FD-FMNIST | floor | noise | ratio to floor "
    "| precision / recall | class accuracy (real) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
  ]
  for run in runs:
    real, noise = run["baselines"]["real"], run["baselines"]["noise"]
    for e in run["evaluations"]:
      lines.append(
        f"| {run['recipe']} | {e['step']} | {e['wall_seconds']:.0f} | {e['fd_fmnist']:.3f} "
        f"| {real['fd_fmnist']:.3f} | {noise['fd_fmnist']:.1f} "
        f"| {e['fd_fmnist'] / real['fd_fmnist']:.1f} "
        f"| {e['precision']:.3f} / {e['recall']:.3f} "
        f"| {e['class_accuracy']:.3f} ({real['class_accuracy']:.3f}) |"
      )
  return "\n".join(lines)


def at_equal_time(runs: list[dict], seconds: float) -> str:
  """Each run's last evaluation made within `seconds` of training wall time."""
  parts = []
  for run in runs:
    done = [e for e in run["evaluations"] if e["wall_seconds"] <= seconds]
    if done:
      e = done[-1]
      parts.append(f"{run['recipe']} {e['fd_fmnist']:.3f} (step {e['step']})")
  return f"FD-FMNIST within {seconds:.0f} s of training wall time: " + ", ".join(parts)


def plot(runs: list[dict], path: str) -> str:
  try:
    import matplotlib  # lazily: only the plot needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
  except ImportError:
    return "matplotlib is not installed: plot skipped"
  figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for axis, x_key, label in ((axes[0], "step", "training steps"), (axes[1], "wall_seconds", "")):
    for run in runs:
      x = [e[x_key] for e in run["evaluations"]]
      axis.plot(x, [e["fd_fmnist"] for e in run["evaluations"]], "o-", label=run["recipe"])
    floor = runs[0]["baselines"]["real"]["fd_fmnist"]
    axis.axhline(floor, color="gray", linestyle="--", label=f"floor {floor:.2f}")
    axis.set_yscale("log")
    axis.set_xlabel(label or "training wall-clock seconds (compilation included)")
    axis.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("FD-FMNIST (EMA weights)")
  axes[0].legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  return f"wrote {path}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--recipes", default="fmnist", help=f"comma-separated of {sorted(RECIPES)}")
  parser.add_argument("--seconds", type=float, default=540, help="wall-clock budget per recipe")
  parser.add_argument("--steps", type=int, default=0, help="also stop at this step (0: recipe's)")
  parser.add_argument("--eval_every", type=int, default=1000)
  parser.add_argument("--num_samples", type=int, default=5000)
  parser.add_argument("--sample_batch", type=int, default=1000)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the trained models")
  parser.add_argument("--workdir_root", default="workdir/quality_runs")
  parser.add_argument("--cache_dir", default="workdir/quality", help="the classifier's cache")
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "quality.png"))
  parser.add_argument("--no-append", action="store_true")
  parser.add_argument("--reuse", action="store_true", help="read finished runs, train the rest")
  parser.add_argument("extra", nargs="*", help="more --config overrides for every recipe")
  args = parser.parse_args()

  runs = [train_with_evaluations(r, args) for r in filter(None, args.recipes.split(","))]
  text = table(runs)
  if len(runs) > 1:
    text += "\n\n" + at_equal_time(runs, min(r["evaluations"][-1]["wall_seconds"] for r in runs))
  print(text)
  print(plot(runs, args.plot))
  if not args.no_append:
    import jax

    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    entry = (
      f"\n## Sample quality against steps and seconds (FD-FMNIST), "
      f"{datetime.date.today().isoformat()}\n\n"
      f"Device: {jax.devices()[0].device_kind}, host {platform.machine()} with {os.cpu_count()} "
      f"cores. Command: `{command.strip()}`. EMA weights, {args.num_samples} samples per "
      f"evaluation; wall seconds from the process start, compilation included, evaluations "
      f"excluded.\n\n{text}\n"
    )
    results.append(args.results, entry)


if __name__ == "__main__":
  main()
