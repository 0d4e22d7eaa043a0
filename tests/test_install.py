"""The package as a user installs it, on a machine without TensorFlow: `pip install .` gives a
`dim-jax` command that trains the installed demo recipe from any folder and writes its
end-of-training grid through the tensorboardX writer.

Cheap on purpose: the package goes into a throwaway folder without its dependencies (the suite's
environment has them).
"""

import shutil
import subprocess
import sys

from tensorboard.backend.event_processing import event_accumulator

from tests.no_tensorflow import REPO, run_without_tensorflow


def test_installed_command_trains_the_installed_demo_recipe_without_tensorflow(tmp_path):
  # pip builds in the source tree: a copy keeps build/ and *.egg-info out of the checkout.
  source, site = tmp_path / "source", tmp_path / "site"
  shutil.copytree(
    REPO, source, symlinks=True, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "work*")
  )
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
     "--target", str(site), str(source)],
    check=True, capture_output=True,
  )  # fmt: skip
  where = run_without_tensorflow(
    [sys.executable, "-m", "dim_jax.configs"], tmp_path, python_path=site, cwd=tmp_path
  ).stdout.strip()
  assert where == str(site / "dim_jax" / "configs"), where  # the installed copy, not the checkout

  workdir = tmp_path / "run"
  command = [
    str(site / "bin" / "dim-jax"), f"--config={where}/demo.py:smoke", f"--workdir={workdir}",
    # With test_train.py's patch size and sampling steps, the compilation cache serves both.
    "--config.model.patch_size=4", "--config.sample.steps=2",
  ]  # fmt: skip
  train = run_without_tensorflow(command, tmp_path, python_path=site, cwd=tmp_path)
  assert "tensorboardX" in train.stderr
  assert (workdir / "checkpoints" / "10").is_dir()
  assert (workdir / "samples_0000010.png").is_file()
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"images": 0})
  events.Reload()
  assert [e.step for e in events.Images("samples")] == [10]
