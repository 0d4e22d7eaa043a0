"""What the training loop shows and how it stops: the progress line's interval mean, a profiler
trace of chosen steps, and Ctrl-C saving like a preemption (with grain worker processes)."""

import os
import signal
import subprocess
import sys

import numpy as np

from dim_jax import metrics, train
from tests.test_train import REPO, tiny_config


class _RecordingWriter:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def __getattr__(self, name):  # hparams, images, flush: not needed here
    return lambda *args, **kwargs: None


def _train(tmp_path, monkeypatch, name, **train_fields):
  writer = _RecordingWriter()
  monkeypatch.setattr(metrics, "create_writer", lambda workdir: writer)
  config = tiny_config(num_steps=4)
  config.sample.num_images = 0
  config.train.update(**train_fields)
  train.train_and_evaluate(config, str(tmp_path / name))
  return writer.scalars


def test_logged_loss_is_the_interval_mean_and_profile_steps_write_a_trace(tmp_path, monkeypatch):
  every_step = _train(tmp_path, monkeypatch, "every", log_every=1)
  pairs = _train(tmp_path, monkeypatch, "pairs", log_every=2, profile_steps="2:3")
  assert sorted(pairs) == [2, 4]
  for step in (2, 4):
    mean = np.mean([every_step[step - 1]["loss"], every_step[step]["loss"]])
    np.testing.assert_allclose(pairs[step]["loss"], mean, rtol=1e-6)
    assert pairs[step]["grad_norm"] == every_step[step]["grad_norm"]  # the others: that step's
  traces = list((tmp_path / "pairs" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly_with_grain_workers(tmp_path):
  overrides = dict(  # test_train.tiny_config, so that the compilation cache serves both
    **{"model.width": 32, "model.depth": 5, "model.patch_size": 4, "model.d_state": 4},
    **{"train.batch_size": 8, "train.num_steps": 10_000, "train.log_every": 1},
    **{"train.checkpoint_every": 10_000, "sample.num_images": 0, "data.worker_count": 1},
  )
  run = subprocess.Popen(
    [sys.executable, "-m", "dim_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}"]
    + [f"--config.{k}={v}" for k, v in overrides.items()],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # its own process group, as a terminal's foreground job
  )
  log = []
  for line in run.stderr:
    log.append(line)
    if "step 3/10000" in line:  # training, workers running: press Ctrl-C (the whole group)
      os.killpg(run.pid, signal.SIGINT)
      break
  log += run.stderr.readlines()
  assert run.wait(timeout=300) == 0, "".join(log[-30:])
  text = "".join(log)
  assert text.count("Received signal 2: saving a checkpoint and stopping.") == 1
  assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3, saved
