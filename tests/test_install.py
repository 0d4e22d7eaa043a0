"""The package as a user installs it, on a machine without TensorFlow: `pip install .` gives a
`dim-jax` command that trains the installed demo recipe from any folder, writes its end-of-training
grid through the tensorboardX writer, and --mode=evaluate writes its JSON.

Cheap on purpose: the package goes into a throwaway folder without its dependencies (the suite's
environment has them), and TensorFlow is hidden by a `tensorflow` package that fails to import.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from tests.test_evaluate_mode import _random_inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_installed_command_trains_and_evaluates_without_tensorflow(tmp_path):
  # pip builds in the source tree: a copy keeps build/ and *.egg-info out of the checkout.
  source = tmp_path / "source"
  shutil.copytree(
    REPO, source, symlinks=True, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "work*")
  )
  site = tmp_path / "site"
  _run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
     "--target", str(site), str(source)],
  )  # fmt: skip
  hidden = tmp_path / "hide_tf" / "tensorflow"
  hidden.mkdir(parents=True)
  (hidden / "__init__.py").write_text("raise ImportError('TensorFlow is hidden by the test')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{hidden.parent}{os.pathsep}{site}")
  where = _run([sys.executable, "-m", "dim_jax.configs"], cwd=tmp_path, env=env).stdout.strip()
  assert where == str(site / "dim_jax" / "configs"), where  # the installed copy, not the checkout

  workdir, recipe = tmp_path / "run", f"{where}/demo.py:smoke"
  # With test_train.py's patch size and sampling steps, the compilation cache serves both.
  command = [
    str(site / "bin" / "dim-jax"), f"--config={recipe}", f"--workdir={workdir}",
    "--config.model.patch_size=4", "--config.sample.steps=2",
  ]  # fmt: skip
  train = _run(command, cwd=tmp_path, env=env)
  assert "tensorboardX" in train.stderr
  assert (workdir / "checkpoints" / "10").is_dir()
  assert (workdir / "samples_0000010.png").is_file()
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"images": 0})
  events.Reload()
  assert [e.step for e in events.Images("samples")] == [10]

  _random_inception(tmp_path / "inception.npz")
  np.savez(
    tmp_path / "ref.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32)
  )
  overrides = [
    f"--config.eval.inception_path={tmp_path / 'inception.npz'}",
    f"--config.eval.ref_stats={tmp_path / 'ref.npz'}",
    "--config.eval.num_samples=4",
  ]
  _run([*command, "--mode=evaluate", *overrides], cwd=tmp_path, env=env)
  written = json.loads((workdir / "eval_10.json").read_text())
  assert np.isfinite(written["fid"]) and written["num_samples"] == 4
