"""Loss parity over GPUs: one process per GPU (launch/gpu.sh --local=N) against one GPU, same
global batch.

  python benchmarks/multi_gpu.py --gpus 2 --config configs/pretrain_256.py:smoke --steps 20

Each process reads its rows of the same global batches (dim_jax/data/pipeline.py) and the step's
noise is drawn for the global batch, so the two runs see the same numbers: their losses may
differ only by the order of the cross-device reductions (fp32 rounding, growing slowly with the
steps as any perturbation of training does). Prints a table of both losses per step and the
largest relative difference, and appends it to benchmarks/RESULTS.md.
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from dim_jax import metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 1e-3  # relative: fp32 reduction order over a few dozen steps, far below batch noise


def run(command: list[str], env: dict) -> str:
  print("+", " ".join(command), flush=True)
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc.stdout + proc.stderr


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gpus", type=int, default=2)
  parser.add_argument("--config", default="configs/pretrain_256.py:smoke")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  args = parser.parse_args()

  root = tempfile.mkdtemp(prefix="dim_jax_parity_")
  flags = [f"--config={args.config}", f"--config.train.num_steps={args.steps}"]
  flags += ["--config.train.log_every=1", "--config.sample.num_images=0"]
  flags += [f"--config.train.checkpoint_every={args.steps}"]
  one_env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
  one_log = run([sys.executable, "-m", "dim_jax.main", f"--workdir={root}/one", *flags], one_env)
  many_log = run(
    ["bash", "launch/gpu.sh", f"--local={args.gpus}", f"--workdir={root}/many", *flags],
    dict(os.environ),
  )
  one = metrics.logged_scalar(one_log, "loss")
  many = metrics.logged_scalar(many_log, "loss", line_prefix="[0]")
  if sorted(one) != sorted(many) or not one:
    sys.exit(f"logged steps differ: one GPU {sorted(one)}, {args.gpus} GPUs {sorted(many)}")

  lines = [
    f"| step | loss, 1 GPU | loss, {args.gpus} processes × 1 GPU | relative difference |",
    "| ---: | ---: | ---: | ---: |",
  ]
  worst = 0.0
  for step in sorted(one):
    diff = abs(many[step] - one[step]) / abs(one[step])
    worst = max(worst, diff)
    lines.append(f"| {step} | {one[step]:.6g} | {many[step]:.6g} | {diff:.2e} |")
  lines += [
    "",
    "| figure | value | bound | ratio |",
    "| --- | ---: | ---: | ---: |",
    f"| largest relative loss difference | {worst:.2e} | {BOUND:.0e} | {worst / BOUND:.3f} |",
  ]
  table = "\n".join(lines)
  print(table)
  device = "CPU (no nvidia-smi)"
  if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    device = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")[0]
  command = "python benchmarks/multi_gpu.py " + " ".join(sys.argv[1:])
  results.append(
    args.results,
    f"\n## Loss parity, {args.gpus} GPUs vs 1, {datetime.date.today().isoformat()}\n\n"
    f"Device: {args.gpus}× {device}. Command: `{command.strip()}`. Same global batch "
    f"({args.config}); one process per GPU through launch/gpu.sh.\n\n{table}\n",
  )


if __name__ == "__main__":
  main()
