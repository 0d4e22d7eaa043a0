"""End-to-end training on the demo set: loss falls, resume is bit-exact, bad input is refused."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax import checkpoint, data, diffusion, parallel, train, train_state
from dim_jax.configs import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_steps: int):
  c = demo.get_config()
  c.model.update(width=32, depth=5, patch_size=4, d_state=4)
  c.train.update(batch_size=8, num_steps=num_steps, log_every=2, checkpoint_every=4)
  c.sample.update(num_images=4, batch_size=4, steps=2)
  c.eval.every = 0  # the tests that evaluate turn it on
  return c


def _loss_on_fixed_batch(config, params, graphdef):
  it = data.create_train_iterator(config.data, batch_size=32, seed=123)
  batch = next(it)
  schedule = diffusion.create_schedule(config.diffusion)
  model = nnx.merge(graphdef, params)
  losses = [
    diffusion.training_loss(
      model,
      schedule,
      jnp.asarray(batch["image"]),
      jnp.asarray(batch["label"]),
      jax.random.key(k),
      p_uncond=0.0,
      null_label=config.model.num_classes,
    )[0]
    for k in range(4)
  ]
  return float(np.mean(losses))


def test_demo_training_loss_falls(tmp_path):
  config = tiny_config(num_steps=60)
  config.optim.learning_rate = 2e-3
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state["step"]) == 60
  graphdef, init_state, _, _ = train_state.build_state(config)
  initial = _loss_on_fixed_batch(config, jax.jit(init_state)()["params"], graphdef)
  trained = _loss_on_fixed_batch(config, state["params"], graphdef)
  assert trained < 0.8 * initial, (initial, trained)
  assert list(tmp_path.glob("samples_*.png")), "no sample grid written"


def test_resume_continues_bit_for_bit(tmp_path):
  straight = train.train_and_evaluate(tiny_config(num_steps=8), str(tmp_path / "straight"))
  train.train_and_evaluate(tiny_config(num_steps=4), str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(tiny_config(num_steps=8), str(tmp_path / "resumed"))
  for name in ("params", "ema_params", "opt_state"):
    same = jax.tree.map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), straight[name], resumed[name]
    )
    assert all(jax.tree.leaves(same)), f"{name} differs after resuming"


def test_checkpoint_of_another_model_is_refused(tmp_path):
  train.train_and_evaluate(tiny_config(num_steps=1), str(tmp_path))
  other = tiny_config(num_steps=2)
  other.model.width = 48
  graphdef, init_state, _, _ = train_state.build_state(other)
  abstract = jax.eval_shape(init_state)
  mesh = parallel.create_mesh(other.mesh)
  manager = checkpoint.create_manager(str(tmp_path))
  with pytest.raises(ValueError, match="different model"):
    checkpoint.restore(
      manager, abstract, parallel.state_shardings(abstract, mesh, other.mesh.rules)
    )


def _run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "dim_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.model.widht=3"], "widht"),
    (["--config.model.input_size=33"], "divisible by model.patch_size"),
    (["--config.sample.sampler=nope", "--mode=sample"], "nope"),
    # A preset name from the command line reaches the preset table (the default is a string).
    (["--config.model.variant=Q/2"], "model.variant='Q/2'"),
  ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
  result = _run_main("--config=configs/demo.py", f"--workdir={tmp_path}", *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_unwritable_workdir_is_one_clear_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = _run_main("--config=configs/demo.py", f"--workdir={blocker}/run")
  assert result.returncode != 0
  assert "not writable" in result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_finetune_smoke_starts_from_pretrain_smoke_checkpoint(tmp_path):
  from dim_jax.configs import finetune_512, pretrain_256

  pre = pretrain_256.get_config("smoke")
  pre.train.num_steps = 2
  pre.sample.num_images = 0
  pretrained = train.train_and_evaluate(pre, str(tmp_path / "pre"))
  fine = finetune_512.get_config("smoke")
  fine.train.update(num_steps=1, init_from=str(tmp_path / "pre"))
  fine.optim.learning_rate = 0.0  # so that step 1 leaves the transferred weights unchanged
  fine.sample.num_images = 0
  tuned = train.train_and_evaluate(fine, str(tmp_path / "fine"))
  old = np.asarray(pretrained["params"]["pos_embed"][...])
  new = np.asarray(tuned["params"]["pos_embed"][...])
  assert old.shape == (2 + 16 * 16, 32) and new.shape == (2 + 32 * 32, 32)
  np.testing.assert_array_equal(new[:2], old[:2])  # the t / y rows are kept as they are
  before, after = (
    {checkpoint.param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(s["params"])}
    for s in (pretrained, tuned)
  )
  assert set(before) == set(after)
  for name in set(before) - {"pos_embed"}:  # every other weight as it was
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_relative_workdir_gets_checkpoints(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = tiny_config(num_steps=2)
  config.sample.num_images = 0
  train.train_and_evaluate(config, "relative/run")
  assert (tmp_path / "relative" / "run" / "checkpoints" / "2").is_dir()


def test_keep_every_keeps_milestones_beyond_the_latest(tmp_path):
  config = tiny_config(num_steps=8)
  config.sample.num_images = 0
  config.train.update(checkpoint_every=2, keep_checkpoints=1, keep_every=4)
  train.train_and_evaluate(config, str(tmp_path))
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [4, 8], kept
