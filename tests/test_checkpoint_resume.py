"""Resume on another process layout through checkpoint.py: the restored step alone places every
process's input, for checkpoints written now and for older ones that also hold a grain state."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dim_jax import checkpoint, data

BATCH = 6
CFG = dict(name="shapes", image_size=8, num_examples=17, worker_count=0)  # an epoch: 2.8 batches


def _state(step: int) -> dict:
  w = jnp.arange(BATCH, dtype=jnp.float32)
  step = jnp.asarray(step, jnp.int32)
  return {"step": step, "params": {"w": w}, "opt_state": {"mu": 0 * w}, "ema_params": {"w": w + 1}}


def _restore_step(workdir) -> int:
  """What train.py does: restore the latest checkpoint, read its step."""
  abstract = jax.eval_shape(lambda: _state(0))
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  manager = checkpoint.create_manager(str(workdir))
  state = checkpoint.restore(manager, abstract, shardings)
  manager.close()
  return int(state["step"])


def _run(seed, num_processes, start, steps):
  """`steps` global batches from `start` as `num_processes` processes read them, stacked, and
  process 0's iterator (for the old checkpoint format)."""
  bounds = np.linspace(0, BATCH, num_processes + 1).astype(int)
  iterators = [
    data.create_train_iterator(CFG, batch_size=BATCH, seed=seed, rows=rows, start_batch=start)
    for rows in zip(bounds[:-1], bounds[1:], strict=True)
  ]
  per_step = [[next(it) for it in iterators] for _ in range(steps)]
  stacked = [
    {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} for batches in per_step
  ]
  return stacked, iterators[0]


def test_a_run_moved_from_2_to_3_to_1_processes_reads_the_uninterrupted_stream(tmp_path):
  """2 processes train 3 steps and write a checkpoint of the old format (state + process 0's grain
  state); 3 processes restore it, train 4 steps and save with checkpoint.save; 1 process restores
  that and trains 2 more. The 9 global batches equal one uninterrupted process's, bit for bit."""
  seed = int(np.random.SeedSequence().entropy % 2**31)
  want, _ = _run(seed, 1, 0, 9)

  got, iterator = _run(seed, 2, 0, 3)
  with ocp.CheckpointManager(
    tmp_path / "checkpoints",
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data_iter": grain.checkpoint.CheckpointHandler(),
    },
  ) as old:  # the format before the step placed the input: it also held each process's iterator
    items = {
      "state": ocp.args.StandardSave(_state(3)),
      "data_iter": grain.checkpoint.CheckpointSave(iterator),
    }
    old.save(3, args=ocp.args.Composite(**items))
    old.wait_until_finished()

  step = _restore_step(tmp_path)
  assert step == 3
  more, _ = _run(seed, 3, step, 4)
  got += more
  manager = checkpoint.create_manager(str(tmp_path))
  assert checkpoint.save(manager, step + 4, _state(step + 4), force=True)
  manager.wait_until_finished()
  manager.close()
  assert not (tmp_path / "checkpoints" / "7" / "data_iter").exists()  # the step is enough

  step = _restore_step(tmp_path)
  assert step == 7
  more, _ = _run(seed, 1, step, 2)
  got += more
  for i, (g, w) in enumerate(zip(got, want, strict=True)):
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=f"seed={seed}, batch {i}, {key!r}")
