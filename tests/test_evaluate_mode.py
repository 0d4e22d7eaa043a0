"""--mode=ref_stats and --mode=evaluate end to end, with random Inception weights on tiny data."""

import json
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from dim_jax.models import inception
from tests.no_tensorflow import REPO, run_without_tensorflow


def _random_inception(path):
  rng = np.random.default_rng(0)
  arrays = {}
  for name, shape in inception.weight_shapes().items():
    value = rng.normal(size=shape).astype(np.float32)
    if name.endswith(".conv.kernel"):
      value *= np.sqrt(2.0 / np.prod(shape[:-1]))  # He scale: activations stay finite
    arrays[name] = np.abs(value) + 0.5 if name.endswith((".var", ".scale")) else value
  np.savez(path, **arrays)


def test_reference_stats_then_evaluate_write_metrics_without_tensorflow(tmp_path):
  """Both modes end to end where TensorFlow is absent (the GPU image), so that the metrics go
  through the tensorboardX writer: the JSON and the image summary are written."""
  _random_inception(tmp_path / "inception.npz")
  script = f"""if True:
    import json
    from dim_jax import evaluate, train
    from tests.test_train import tiny_config

    config = tiny_config(num_steps=1)
    config.sample.update(num_images=0, batch_size=4, steps=2)
    train.train_and_evaluate(config, {str(tmp_path)!r})
    config.eval.update(
      inception_path={str(tmp_path / "inception.npz")!r},
      ref_stats={str(tmp_path / "ref.npz")!r},
      num_samples=8,
      batch_size=8,
    )
    evaluate.reference_stats(config, {str(tmp_path)!r})
    print(json.dumps(evaluate.evaluate(config, {str(tmp_path)!r})))
  """
  run = run_without_tensorflow([sys.executable, "-c", script], tmp_path, cwd=REPO)
  results = json.loads(run.stdout.strip().splitlines()[-1])
  assert np.isfinite(results["fid"]) and results["fid"] >= 0
  assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
  assert results["num_samples"] == 8
  written = json.loads((tmp_path / "eval_1.json").read_text())
  assert written["fid"] == results["fid"]
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  events.Reload()  # an image summary, not clu's tensor: written by tensorboardX
  assert [e.step for e in events.Images("eval/samples")] == [1]
