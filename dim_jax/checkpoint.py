"""Orbax checkpoints of the whole training state.

One composite per step under `<workdir>/checkpoints/<step>`:
  state      {"step", "params", "opt_state", "ema_params"}, restored onto this mesh's shardings
             (so a run can resume on another device count).

The data iterator's position is not saved: step k trains on global batch k of a stream that does
not depend on the process count or row split, so train.py restarts the iterator at the restored
step (data.create_train_iterator's `start_batch`). A per-process grain state would be wrong as soon
as the processes or their rows change. The `data_iter` item of older checkpoints is ignored.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec


def create_manager(
  workdir: str, *, keep: int = 3, save_every: int = 1, keep_period: int = 0
) -> ocp.CheckpointManager:
  """Keeps the `keep` latest checkpoints, and also every step divisible by `keep_period` (> 0)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    keep_period=keep_period or None,
    save_interval_steps=save_every,
    enable_async_checkpointing=True,
  )
  handlers = {"state": ocp.StandardCheckpointHandler()}
  # Orbax wants absolute paths; cloud paths (gs://...) already are.
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  return ocp.CheckpointManager(
    epath.Path(root) / "checkpoints", options=options, item_handlers=handlers
  )


def save(manager: ocp.CheckpointManager, step: int, state, *, force=False) -> bool:
  """Saves (asynchronously) when `step` is due or `force`; returns whether a save started."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state))
  return manager.save(step, args=args, force=force)


def _shapes(tree) -> dict[str, tuple]:
  """{"blocks/0/mixer/in_proj/kernel": shape} for stored metadata and NNX states alike."""
  return {param_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state) -> None:
  """One clear error naming the first parameter missing or misshaped: another model's checkpoint."""
  stored = _shapes(manager.item_metadata(step)["state"].tree["params"])
  expected = _shapes(abstract_state["params"])
  where = manager.directory / str(step)
  for name, shape in expected.items():
    if name not in stored:
      raise ValueError(
        f"checkpoint {where} is from a different model: it has no parameter {name}. "
        "Use another --workdir or the config it was trained with."
      )
    if stored[name] != shape:
      raise ValueError(
        f"checkpoint {where} is from a different model: parameter {name} has shape "
        f"{stored[name]} there and {shape} in this config."
      )
  if len(stored) != len(expected):
    raise ValueError(
      f"checkpoint {where} is from a different model: {len(stored)} parameters there, "
      f"{len(expected)} in this config."
    )


def restore(manager: ocp.CheckpointManager, abstract_state, shardings, step=None):
  """Restores the latest (or given) step onto `shardings`; returns the state, or None if none.
  The data iterator is positioned from the restored state["step"] (see the module docstring)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  check_compatible(manager, step, abstract_state)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  return restored["state"]


def restore_params(workdir: str, abstract_state, shardings, *, use_ema: bool, step=None):
  """Only the (EMA) parameters of a workdir's checkpoint, for sampling and evaluation."""
  manager = create_manager(workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(
      f"no checkpoint in {workdir}/checkpoints: train first with --mode=train and this --workdir."
    )
  state = restore(manager, abstract_state, shardings, step=step)
  key = "ema_params" if use_ema else "params"
  logging.info("Using the %s of step %d", key, int(np.asarray(state["step"])))
  return state[key], step


def transfer_params(workdir: str, abstract_params, shardings, mesh, resize=None):
  """Another run's latest weights for this model (stage transitions such as 256² -> 512²).

  Shapes must match, except where the model offers `resize(name, stored) -> array` (DiM: its
  position table, to the new grid). Returns the parameters placed on `shardings` and a list of what
  was changed, for the log.
  """
  manager = create_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"train.init_from={workdir}: no checkpoint in {workdir}/checkpoints.")
  stored = manager.item_metadata(step)["state"].tree
  replicated = NamedSharding(mesh, PartitionSpec())
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), stored
  )
  source = _shapes_to_arrays(
    manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"][
      "params"
    ]
  )
  changes = [f"weights from {workdir} step {step} (EMA reset to them, optimizer fresh)"]

  def convert(path, abstract):
    name = param_name(path)
    if name not in source:
      raise ValueError(f"train.init_from={workdir}: its checkpoint has no parameter {name}.")
    value = source[name]
    if value.shape != abstract.shape and resize is not None:
      changes.append(f"{name}: {value.shape} -> {abstract.shape} (resized by the model)")
      value = resize(name, value)
    if value.shape != abstract.shape:
      raise ValueError(
        f"train.init_from={workdir}: parameter {name} has shape {value.shape} there and "
        f"{abstract.shape} in this config; the model cannot resize it."
      )
    return value.astype(abstract.dtype)

  params = jax.tree_util.tree_map_with_path(convert, abstract_params)
  return jax.device_put(params, shardings), changes


def param_name(path) -> str:
  """ "blocks/0/mixer/in_proj/kernel" for a pytree path into an NNX state or stored metadata."""
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return "/".join(k for k in keys if k != "value")


def _shapes_to_arrays(tree) -> dict:
  return {param_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
