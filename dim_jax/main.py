"""Entry point: flags and platform set-up only; the work is a library call per --mode.

python -m dim_jax.main --config=configs/demo.py --workdir=workdir/demo
python -m dim_jax.main --config=configs/demo.py --workdir=workdir/demo --mode=sample
dim-jax --config=configs/demo.py --workdir=workdir/demo  # the same, once installed
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "sample", "evaluate", "ref_stats", "extract_latents"],
  "train (resumes by itself) | sample (PNG grid + .npz) | evaluate (FID, sFID, IS, P/R) | "
  "ref_stats (Inception statistics of `data`) | extract_latents (VAE moments of `data`).",
)
flags.DEFINE_integer(
  "num_images", None, "--mode=sample: how many images (default sample.num_images).", lower_bound=1
)
flags.DEFINE_string(
  "out", None, "--mode=sample: folder for the PNG grid and .npz (default: the workdir)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _orbax_in_one_line(record: pylogging.LogRecord) -> bool:
  """Orbax's per-save INFO chatter stays out of the progress log; its warnings and errors show as
  one line each (a failed save, e.g. a full disk, logs a traceback from each of its threads
  before the error reaches main, which prints it)."""
  if f"{os.sep}orbax{os.sep}" not in record.pathname:
    return True
  if record.levelno < pylogging.WARNING:
    return False
  return _without_traceback(record)


def _without_traceback(record: pylogging.LogRecord) -> bool:
  record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def _drop_closed_loop_callbacks(hook):
  """After a failed save Orbax closes its event loop while TensorStore's threads still finish
  writes; each then reports "Event loop is closed" as an unraisable exception, hundreds in all."""

  def unraisablehook(unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      hook(unraisable)

  return unraisablehook


def _quiet_libraries() -> None:
  """DIM_JAX_TRACEBACK=1 keeps every library traceback."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ start-up notices
  pylogging.getLogger("absl").addFilter(_orbax_in_one_line)
  if not os.environ.get("DIM_JAX_TRACEBACK"):
    # Orbax's write tasks that failed with the save, reported again by asyncio at exit.
    pylogging.getLogger("asyncio").addFilter(_without_traceback)
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _initialize_distributed(jax) -> None:
  """jax.distributed.initialize() when the environment names several processes.

  TPU pods (launch/tpu.sh sets DIM_JAX_DISTRIBUTED=1) are auto-detected by JAX; GPU hosts
  (launch/gpu.sh) pass the coordinator, the process count and this process's index.
  """
  env = os.environ
  if "DIM_JAX_COORDINATOR" in env:
    jax.distributed.initialize(
      coordinator_address=env["DIM_JAX_COORDINATOR"],
      num_processes=int(env["DIM_JAX_NUM_PROCESSES"]),
      process_id=int(env["DIM_JAX_PROCESS_ID"]),
    )
  elif env.get("DIM_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def _setup_platform() -> None:
  """Multi-host init, a persistent compilation cache, TensorFlow kept off the accelerators."""
  import jax

  _initialize_distributed(jax)
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/dim_jax/jax"))
  jax.config.update("jax_compilation_cache_dir", cache)
  try:  # clu imports TensorFlow, which must not reserve GPU memory.
    import tensorflow as tf

    tf.config.experimental.set_visible_devices([], "GPU")
  except ImportError:
    pass
  logging.info(
    "JAX %s: process %d of %d, %d local / %d global devices (%s)",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )


def _parse_flags(argv):
  """absl's parser, with config errors (missing recipe, unknown field, bad value) reduced to one
  line, before anything is written."""
  for i, arg in enumerate(argv):  # a missing recipe fails later and less clearly in absl
    recipe = arg[len("--config=") :] if arg.startswith("--config=") else None
    if arg == "--config" and i + 1 < len(argv):
      recipe = argv[i + 1]
    if recipe is not None and not os.path.isfile(recipe.split(":", 1)[0]):
      sys.exit(
        f"error: --config={recipe}: no such file; the recipes are configs/*.py in a checkout "
        "(installed: `python -m dim_jax.configs` prints their folder)."
      )
  try:
    argv = FLAGS(argv)
    FLAGS.config.get("seed")  # a recipe that failed to load (OSError) raises when first read
    return argv
  except OSError as e:
    sys.exit(f"error: --config: {' '.join(str(e).split())}")
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).replace("\\n", "\n").replace("\\'", "'")
    if "Error whilst parsing config file" in message:  # the recipe's own error: the last line
      message = [line.strip() for line in message.splitlines() if line.strip()][-1]
      message = message.split(": ", 1)[-1]  # without "ValueError: "
    message = " ".join(message.split())
    if len(message) > 1 and message[0] == message[-1] == "'":
      message = message[1:-1]
    kind = "unknown config field" if isinstance(e, AttributeError | KeyError) else "bad flag"
    sys.exit(f"error: {kind}: {message}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _quiet_libraries()
  _setup_platform()
  from dim_jax import train  # after platform set-up: importing JAX code initialises backends

  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      from dim_jax import sample

      sample.sample_from_workdir(
        FLAGS.config, FLAGS.workdir, num_images=FLAGS.num_images, out=FLAGS.out
      )
    else:
      from dim_jax import evaluate

      evaluate.MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)
  except (ValueError, OSError, FloatingPointError) as e:
    if os.environ.get("DIM_JAX_TRACEBACK"):
      raise
    logging.error("%s", e)
    sys.exit(f"error: {e}")


def run() -> None:
  """The `dim-jax` command."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
