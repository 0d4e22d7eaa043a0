"""Every bad input answered in one line, with nothing lost: the message, the exit status, and the
workdir's checkpoints and files as they were."""

import os

import numpy as np
import pytest
from PIL import Image

from dim_jax import main, sample, train
from tests.test_train import tiny_config


def _parse_error(argv) -> str:
  """The one line `dim-jax ARGS` exits with (status 1) while parsing its flags."""
  with pytest.raises(SystemExit) as exit_info:
    main._parse_flags(["dim-jax", *argv])
  message = exit_info.value.code
  assert isinstance(message, str) and "\n" not in message, message  # printed, status 1
  return message


def test_mistyped_config_path_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  message = _parse_error(["--config=configs/dmo.py", f"--workdir={workdir}", "--config.seed=3"])
  assert message.startswith("error: --config=configs/dmo.py: no such file")
  assert "python -m dim_jax.configs" in message
  assert not workdir.exists()


@pytest.mark.parametrize(
  "flag, expected",
  [
    ("--num_images=-3", "--num_images=-3: -3 is not a positive integer"),
    ("--num_images=0", "--num_images=0: 0 is not a positive integer"),
    ("--config=configs/demo.py:tiny", "config argument 'tiny': the only one is 'smoke'"),
  ],
)
def test_bad_flag_is_one_line(tmp_path, flag, expected):
  args = ["--config=configs/demo.py", f"--workdir={tmp_path / 'run'}", "--mode=sample", flag]
  assert expected in _parse_error(args)
  assert not (tmp_path / "run").exists()


def test_more_class_folders_than_model_classes_is_one_line(tmp_path):
  rng = np.random.default_rng()
  for name in "abcdefg":  # 7 classes; the demo model has 4
    os.makedirs(tmp_path / "images" / name)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "images" / name / "0.png")
  config = tiny_config(num_steps=2)
  config.data.update(name="image_folder", data_dir=str(tmp_path / "images"))
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "7 classes but model.num_classes=4" in message and "\n" not in message
  assert "--config.model.num_classes=7" in message
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_sampling_writes_elsewhere_and_never_over_an_earlier_file(tmp_path):
  config = tiny_config(num_steps=1)
  config.sample.num_images = 0
  train.train_and_evaluate(config, str(tmp_path / "run"))
  before = sorted(os.listdir(tmp_path / "run"))
  config.sample.update(num_images=2, batch_size=2)
  out = tmp_path / "samples"
  first = sample.sample_from_workdir(config, str(tmp_path / "run"), out=str(out))
  second = sample.sample_from_workdir(config, str(tmp_path / "run"), out=str(out), num_images=1)
  assert first != second and os.path.dirname(first) == os.path.dirname(second) == str(out)
  assert np.load(first[: -len(".png")] + ".npz")["images"].shape[0] == 2  # the first is kept
  assert np.load(second[: -len(".png")] + ".npz")["images"].shape[0] == 1
  assert sorted(os.listdir(tmp_path / "run")) == before  # nothing written into the workdir

  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(
    ValueError, match=rf"^--out={blocker}/x is not writable \(.*\); choose another"
  ):
    sample.sample_from_workdir(config, str(tmp_path / "run"), out=str(blocker / "x"))
