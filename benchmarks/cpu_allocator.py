"""The CPU train step under glibc's allocator settings: why `make demo` sets GLIBC_TUNABLES.

  python -m benchmarks.cpu_allocator                  # the demo recipe's step, 30 steps each
  python -m benchmarks.cpu_allocator --steps 5 --no-append

XLA's CPU runtime allocates each step's temporaries afresh. glibc serves large blocks with fresh
`mmap`s and returns them when freed, so each step faults its temporaries in again: system time. Each
setting runs in a process of its own (glibc reads GLIBC_TUNABLES at start): configs/demo.py's train
step (train.make_train_step, jitted with donation as train.py does) on one batch held in memory,
timed over --steps steps after 3 warm-up steps, with the process's user and system CPU time and
minor page faults per step (getrusage) and the step's temporaries (the compiled step's memory
analysis). The bound is the step time without tunables; ratio = ms / bound.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402

KEEP_FREED_MEMORY = (  # the Makefile's CPU_MALLOC
  "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1"
)
SETTINGS = (
  "",
  "glibc.malloc.arena_max=1",
  "glibc.malloc.mmap_max=0",
  "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1",
  KEEP_FREED_MEMORY,
)


def time_demo_step(steps: int) -> dict:
  """In this process: the demo's compiled train step, timed on one held batch."""
  import jax
  import numpy as np

  from dim_jax import diffusion, train, train_state
  from dim_jax.configs import demo

  config = demo.get_config()
  graphdef, init_state, tx, lr_schedule = train_state.build_state(config)
  state = jax.jit(init_state)()
  schedule = diffusion.create_schedule(config.diffusion)
  step = jax.jit(
    train.make_train_step(config, graphdef, tx, lr_schedule, schedule), donate_argnums=0
  )
  rng = np.random.default_rng()
  size, batch_size = config.model.input_size, config.train.batch_size
  batch = dict(
    image=jax.numpy.asarray(rng.uniform(-1, 1, (batch_size, size, size, 3)), "float32"),
    label=jax.numpy.asarray(rng.integers(0, config.model.num_classes, batch_size), "int32"),
  )
  compiled = step.lower(state, batch).compile()
  for _ in range(3):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return dict(
    ms=1e3 * seconds / steps,
    user_ms=1e3 * (after.ru_utime - before.ru_utime) / steps,
    sys_ms=1e3 * (after.ru_stime - before.ru_stime) / steps,
    faults=(after.ru_minflt - before.ru_minflt) / steps,
    temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2**20,
    peak_rss_gb=after.ru_maxrss / 2**20,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()
  if args.child:
    print(json.dumps(time_demo_step(args.steps)))
    return

  rows = []
  for tunables in SETTINGS:
    env = dict(os.environ, JAX_PLATFORMS="cpu", GLIBC_TUNABLES=tunables)
    command = [sys.executable, "-m", "benchmarks.cpu_allocator", "--child", f"--steps={args.steps}"]
    child = subprocess.run(
      command, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows.append((tunables, json.loads(child.stdout.strip().splitlines()[-1])))
    print(f"{tunables or '(unset)'}: {rows[-1][1]['ms']:.0f} ms/step", flush=True)

  bound = rows[0][1]["ms"]
  lines = [
    "| GLIBC_TUNABLES | ms/step | bound (unset) | ratio | user ms | sys ms | minor faults/step "
    "| temporaries MB | peak RSS GB |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for tunables, r in rows:
    lines.append(
      f"| {tunables.replace('glibc.malloc.', '') or '(unset)'} | {r['ms']:.0f} | {bound:.0f} "
      f"| {r['ms'] / bound:.2f} | {r['user_ms']:.0f} | {r['sys_ms']:.0f} | {r['faults']:.0f} "
      f"| {r['temp_mb']:.0f} | {r['peak_rss_gb']:.2f} |"
    )
  table = "\n".join(lines)
  print(table)
  if not args.no_append:
    command = "python -m benchmarks.cpu_allocator " + " ".join(sys.argv[1:])
    results.append(
      args.results,
      f"\n## The demo's CPU step under glibc allocator settings, "
      f"{datetime.date.today().isoformat()}\n\n"
      f"Host: {platform.machine()}, {os.cpu_count()} cores. Command: `{command.strip()}`. "
      f"{args.steps} steps per setting, each in its own process.\n\n{table}\n",
    )


if __name__ == "__main__":
  main()
