"""The metric writers (clu's with TensorFlow, tensorboardX without) with the arguments the callers
pass: (1, H, W, C) uint8 grids, dicts of NumPy / JAX scalars, the nested config as hparams."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from dim_jax import metrics
from dim_jax.configs import demo


def _write_as_the_callers_do(writer, rng) -> dict:
  """What train.py and evaluate.py write; returns what should be read back."""
  rgb = rng.integers(0, 256, size=(1, 10, 14, 3), dtype=np.uint8)  # image_grid(images)[None]
  gray = rng.integers(0, 256, size=(1, 6, 6, 1), dtype=np.uint8)  # a Fashion-MNIST grid
  losses = rng.uniform(0.1, 2.0, size=3)
  writer.write_hparams(demo.get_config().to_dict())
  for step, loss in enumerate(losses, start=1):
    writer.write_scalars(step, {"loss": np.float32(loss), "lr": jnp.float32(1e-4), "bad_files": 0})
  writer.write_images(3, {"samples": rgb, "eval/samples": gray})
  writer.flush()
  writer.close()
  return {"loss": losses, "samples": rgb[0], "eval/samples": gray[0]}


def _read_events(logdir) -> tuple[dict, dict]:
  """{tag: [(step, value)]} of scalars and {tag: [(step, PNG bytes)]} of images, from either
  writer (TF2 summaries, clu's, store both as tensors)."""
  events = event_accumulator.EventAccumulator(
    str(logdir), size_guidance={"images": 0, "tensors": 0}
  )
  events.Reload()
  scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
  images = {
    t: [(e.step, e.encoded_image_string) for e in events.Images(t)] for t in events.Tags()["images"]
  }
  for tag in events.Tags()["tensors"]:
    plugin = events.SummaryMetadata(tag).plugin_data.plugin_name
    for e in events.Tensors(tag):
      value = tensor_util.make_ndarray(e.tensor_proto)
      if plugin == "scalars":
        scalars.setdefault(tag, []).append((e.step, float(value)))
      elif plugin == "images":  # [width, height, png, ...]
        images.setdefault(tag, []).append((e.step, value[2]))
  return scalars, images


def _check_events(logdir, want: dict) -> None:
  scalars, images = _read_events(logdir)
  assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in scalars["loss"]], want["loss"], rtol=1e-6)
  for key in ("samples", "eval/samples"):
    ((step, png),) = images[key]
    assert step == 3
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    decoded = decoded.reshape(*want[key].shape[:2], -1)  # grey may come back as L or RGB
    np.testing.assert_array_equal(decoded, np.broadcast_to(want[key], decoded.shape), key)


def test_tensorboardx_writer_takes_what_the_callers_pass(tmp_path):
  want = _write_as_the_callers_do(
    metrics.TensorboardXWriter(str(tmp_path)), np.random.default_rng()
  )
  _check_events(tmp_path, want)
  hparams = event_accumulator.EventAccumulator(str(tmp_path))
  hparams.Reload()
  content = b"".join(hparams.PluginTagToContent("hparams").values())
  assert b"optim.learning_rate" in content and b"train.init_from" in content


def test_clu_writer_takes_the_same_calls(tmp_path):
  pytest.importorskip("tensorflow")
  writer = metrics.create_writer(str(tmp_path))
  assert not isinstance(writer, metrics.TensorboardXWriter)
  _check_events(tmp_path, _write_as_the_callers_do(writer, np.random.default_rng()))


def test_a_five_dimensional_image_is_refused_in_one_line(tmp_path):
  writer = metrics.TensorboardXWriter(str(tmp_path))
  with pytest.raises(ValueError, match=r"expected \(N, H, W, C\)"):
    writer.write_images(1, {"video": np.zeros((1, 2, 4, 4, 3), np.uint8)})
  writer.close()


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
