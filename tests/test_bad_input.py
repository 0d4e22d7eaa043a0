"""Every bad input answered in one line, with nothing lost: the message, the exit status, and the
workdir's checkpoints and files as they were."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dim_jax import checkpoint, main, sample, train, train_state
from tests.test_train import REPO, tiny_config


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
  config = tiny_config(num_steps=1)  # samples 4 images in one batch: the compiled sampler's shape
  config.sample.num_images = 0
  train.train_and_evaluate(config, str(tmp_path / "run"))
  before = sorted(os.listdir(tmp_path / "run"))
  config.sample.num_images = 4
  out = tmp_path / "samples"
  first = sample.sample_from_workdir(config, str(tmp_path / "run"), out=str(out))
  kept = {name: (out / name).read_bytes() for name in os.listdir(out)}
  config.seed += 1  # other samples under the same name
  second = sample.sample_from_workdir(config, str(tmp_path / "run"), out=str(out))
  assert first != second and os.path.dirname(first) == os.path.dirname(second) == str(out)
  assert {name: (out / name).read_bytes() for name in kept} == kept  # the first is intact
  assert len(os.listdir(out)) == 2 * len(kept)  # the second .png and .npz beside them
  assert sorted(os.listdir(tmp_path / "run")) == before  # nothing written into the workdir

  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(
    ValueError, match=rf"^--out={blocker}/x is not writable \(.*\); choose another"
  ):
    sample.sample_from_workdir(config, str(tmp_path / "run"), out=str(blocker / "x"))


# --- damaged checkpoints ------------------------------------------------------------------------


def _state(step: int) -> dict:
  w = jnp.arange(6, dtype=jnp.float32) + step
  return {
    "step": jnp.int32(step),
    "params": {"w": w},
    "opt_state": {"mu": 0 * w},
    "ema_params": {"w": -w},
  }


def _damage(step_dir, how: str) -> None:
  state = step_dir / "state"
  if how == "no_metadata":
    (state / "_METADATA").unlink()
    return
  data_files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    blob = path.read_bytes()
    if how == "truncated":
      path.write_bytes(blob[: len(blob) // 2])
    else:  # zeroed
      path.write_bytes(bytes(len(blob)))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "no_metadata"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, how):
  manager = checkpoint.create_manager(str(tmp_path), keep=3)
  for step in (2, 4):
    checkpoint.save(manager, step, _state(step), force=True)
  manager.wait_until_finished()
  _damage(tmp_path / "checkpoints" / "4", how)
  abstract = jax.eval_shape(lambda: _state(0))
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)

  # Sampling reads only the EMA, and changes nothing in the workdir.
  params, step = checkpoint.restore_params(
    str(tmp_path), abstract["params"], shardings["params"], use_ema=True
  )
  assert step == 2 and np.array_equal(params["w"], -_state(2)["params"]["w"])
  assert (tmp_path / "checkpoints" / "4").is_dir()
  with pytest.raises(ValueError, match=r"^train.restore_step=4: checkpoint .* cannot be restored"):
    checkpoint.restore(checkpoint.create_manager(str(tmp_path)), abstract, shardings, step=4)

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    state = checkpoint.restore(checkpoint.create_manager(str(tmp_path)), abstract, shardings)
  assert int(state["step"]) == 2
  ours = [r for r in caplog.records if r.pathname == checkpoint.__file__]  # Orbax adds its own
  (line,) = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
  assert "4 cannot be restored" in line and "moved to 4.damaged" in line and "\n" not in line
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4.damaged"]
  manager = checkpoint.create_manager(str(tmp_path))
  assert checkpoint.save(manager, 4, _state(4), force=True)  # its step is free again
  manager.wait_until_finished()


# --- training runs that must stop before they change anything -------------------------------------


def _listing(root) -> dict:
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rejected_runs_leave_the_workdir_as_it_was(tmp_path):
  config = tiny_config(num_steps=2)
  config.sample.num_images = 0
  train.train_and_evaluate(config, str(tmp_path))
  before = _listing(tmp_path)
  assert "checkpoints/2/commit_success.txt" in before and "config.json" in before
  for field, value, message in [
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be at least 1"),
    ("train.log_every", 0, "train.log_every=0 must be at least 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be at least 1"),
    ("train.profile_steps", "7", "train.profile_steps='7': give 'first:last' steps"),
    ("train.restore_step", 1, r"train.restore_step=1: no such checkpoint .* \(it has \[2\]\)"),
    ("model.width", 48, "is from a different model"),  # a resume with another model
  ]:
    bad = tiny_config(num_steps=4)
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match=message) as error:
      train.train_and_evaluate(bad, str(tmp_path))
    assert "\n" not in str(error.value)
    assert _listing(tmp_path) == before, field  # checkpoints and config.json untouched


def test_non_finite_parameters_are_never_saved_and_the_advice_does_not_loop(tmp_path):
  config = tiny_config(num_steps=8)
  config.optim.update(learning_rate=1e39, warmup_steps=0, grad_clip_norm=0.0)
  config.train.update(checkpoint_every=1, log_every=4)
  config.sample.num_images = 0
  with pytest.raises(FloatingPointError) as first:
    train.train_and_evaluate(config, str(tmp_path))
  graphdef, init_state, _, _ = train_state.build_state(config)
  abstract = jax.eval_shape(init_state)
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  manager = checkpoint.create_manager(str(tmp_path))
  for step in manager.all_steps():  # whatever was saved is finite
    state = checkpoint.restore(manager, abstract, shardings, step=step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), step
  message = str(first.value)
  assert "stopping without saving" in message and "\n" not in message
  with pytest.raises(FloatingPointError) as again:  # the advice followed as far as it goes
    train.train_and_evaluate(config, str(tmp_path))
  assert str(again.value) != message or "No checkpoint was saved" in message, message


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
  # The disk "fills up" (files stop growing past 64 KB) after the first checkpoint, at step 2.
  script = f"""if True:
    import resource, signal, sys
    from dim_jax import checkpoint, main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    save = checkpoint.save

    def save_on_a_full_disk(manager, step, *args, **kwargs):
      if step > 2:
        manager.wait_until_finished()
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))
      return save(manager, step, *args, **kwargs)

    checkpoint.save = save_on_a_full_disk
    sys.argv = ["dim-jax", "--config=configs/demo.py", "--workdir={tmp_path}",
                *{_TINY_FLAGS!r}, "--config.train.num_steps=4"]
    main.run()
  """
  run = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert run.returncode == 1, run.stderr[-3000:]
  (line,) = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
  assert "checkpoints/4" in line and "Failed writing" in line, line
  # Orbax's threads log one line each, without their tracebacks.
  assert "Traceback" not in run.stderr, run.stderr[-4000:]
  saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert saved[0] == "2" and (tmp_path / "checkpoints" / "2" / "commit_success.txt").is_file()
  assert saved[1:] in ([], ["4.orbax-checkpoint-tmp"]), saved  # the failed save: never a step


# The flags that make the demo recipe test_train's tiny_config (the compilation cache serves both).
_TINY_FLAGS = [
  "--config.model.width=32", "--config.model.depth=5", "--config.model.patch_size=4",
  "--config.model.d_state=4", "--config.train.batch_size=8", "--config.train.log_every=2",
  "--config.train.checkpoint_every=2", "--config.sample.num_images=0",
]  # fmt: skip
