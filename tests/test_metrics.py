"""The tensorboardX writer (what the GPU image without TensorFlow uses) and the log parser."""

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from dim_jax import metrics


def test_tensorboardx_writer_round_trips_scalars_images_and_hparams(tmp_path):
  rng = np.random.default_rng()
  losses = rng.uniform(0.1, 2.0, size=4)
  writer = metrics.TensorboardXWriter(str(tmp_path))
  writer.write_hparams({"optim.learning_rate": 2e-4, "model.name": "dim", "mesh": (1, 2)})
  for step, loss in enumerate(losses, start=1):
    writer.write_scalars(step, {"loss": loss, "lr": np.float32(1e-4 * step)})
  writer.write_images(4, {"samples": rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)})
  writer.close()

  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  events.Reload()
  logged = events.Scalars("loss")
  assert [e.step for e in logged] == [1, 2, 3, 4]
  np.testing.assert_allclose([e.value for e in logged], losses, rtol=1e-6)
  assert [e.step for e in events.Images("samples")] == [4]


def test_logged_scalar_reads_the_writers_log_lines():
  log = "\n".join([
    "I1128 12:00:00.1 train.py:1] [3] grad_norm=0.5, loss=0.125, lr=1e-05",
    "[0] I1128 12:00:00.2 train.py:1] [4] loss=1.5e-3, lr=2e-05",
    "[1] I1128 12:00:00.2 train.py:1] [4] loss=9",
    "I1128 12:00:00.3 train.py:1] step 4/10 | loss 0.2 | 3 steps/s",  # the progress line: not it
  ])  # fmt: skip
  assert metrics.logged_scalar(log, "lr") == {3: 1e-05, 4: 2e-05}
  assert metrics.logged_scalar(log, "loss", line_prefix="[0]") == {4: 1.5e-3}
  assert metrics.logged_scalar(log, "grad_norm") == {3: 0.5}
