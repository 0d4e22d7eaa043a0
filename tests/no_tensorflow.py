"""Runs a command in a process where `import tensorflow` fails, as on the GPU image: a package of
that name that raises ImportError comes first on PYTHONPATH (the suite's process has TensorFlow
imported already, so only a new process can go without it)."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without_tensorflow(args, tmp_path, *, python_path=REPO, **kwargs):
  """subprocess.run(args) without TensorFlow and on the CPU; fails the test on a non-zero exit."""
  hidden = tmp_path / "hide_tf" / "tensorflow"
  hidden.mkdir(parents=True, exist_ok=True)
  (hidden / "__init__.py").write_text("raise ImportError('TensorFlow is hidden by the test')\n")
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{hidden.parent}{os.pathsep}{python_path}"
  )
  result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result
