"""Orbax checkpoints of the whole training state.

One composite per step under `<workdir>/checkpoints/<step>`:
  state      {"step", "params", "opt_state", "ema_params"}, restored onto this mesh's shardings
             (so a run can resume on another device count).

Kept: the `train.keep_checkpoints` newest and every multiple of `train.keep_every` (Orbax
preservation policies). A checkpoint that no longer restores (damaged files) is set aside as
`<step>.damaged` and the run resumes from the newest one that does; `train.restore_step` picks one.
Sampling and stage transitions read only the parameters they use (Orbax partial restore).

The data iterator's position is not saved: step k trains on global batch k of a stream that does
not depend on the process count or row split, so train.py restarts the iterator at the restored
step (data.create_train_iterator's `start_batch`). A per-process grain state would be wrong as soon
as the processes or their rows change. The `data_iter` item of older checkpoints is ignored.
"""

import functools
import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


def create_manager(
  workdir: str, *, keep: int = 3, save_every: int = 1, keep_every: int = 0
) -> ocp.CheckpointManager:
  """Saves every `save_every` steps; keeps the `keep` latest checkpoints, and also every step
  divisible by `keep_every` (> 0)."""
  if keep < 1 or save_every < 1 or keep_every < 0:
    raise ValueError(f"keep={keep}, save_every={save_every} must be >= 1, keep_every >= 0.")
  policies = ocp.checkpoint_managers
  keep_policies = [policies.LatestN(n=keep)]
  if keep_every:
    keep_policies.append(policies.EveryNSteps(interval_steps=keep_every))
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=policies.FixedIntervalPolicy(save_every),
    preservation_policy=policies.AnyPreservationPolicy(keep_policies),
    enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(
    _directory(workdir), options=options, item_handlers={"state": ocp.StandardCheckpointHandler()}
  )


def _directory(workdir: str) -> epath.Path:
  # Orbax wants absolute paths; cloud paths (gs://...) already are.
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / "checkpoints"


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager whose restores may take a part of the state (sampling, init_from)."""
  return ocp.CheckpointManager(
    _directory(workdir),
    options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    item_handlers={"state": ocp.PyTreeCheckpointHandler()},
  )


def save(manager: ocp.CheckpointManager, step: int, state, *, force=False) -> bool:
  """Saves (asynchronously) when `step` is due or `force`; returns whether a save started."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state))
  return manager.save(step, args=args, force=force)


class IncompatibleCheckpoint(ValueError):
  """A readable checkpoint of another model (not a damaged one)."""


def _shapes(tree) -> dict[str, tuple]:
  """{"blocks/0/mixer/in_proj/kernel": shape} for stored metadata and NNX states alike."""
  return {param_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """One clear error naming the first parameter missing or misshaped: another model's checkpoint."""
  stored = _shapes(manager.item_metadata(step)["state"].tree["params"])
  expected = _shapes(abstract_params)
  where = manager.directory / str(step)
  for name, shape in expected.items():
    if name not in stored:
      raise IncompatibleCheckpoint(
        f"checkpoint {where} is from a different model: it has no parameter {name}. "
        "Use another --workdir or the config it was trained with."
      )
    if stored[name] != shape:
      raise IncompatibleCheckpoint(
        f"checkpoint {where} is from a different model: parameter {name} has shape "
        f"{stored[name]} there and {shape} in this config."
      )
  if len(stored) != len(expected):
    raise IncompatibleCheckpoint(
      f"checkpoint {where} is from a different model: {len(stored)} parameters there, "
      f"{len(expected)} in this config."
    )


def _first_restorable(manager, restore_step, step: int | None, *, set_aside_damaged: bool):
  """(step, restored) of `step`, else of the newest checkpoint that restores; (None, None) when
  there is none. A damaged checkpoint (truncated or zeroed files, lost metadata) is skipped with
  one log line, and with `set_aside_damaged` renamed to <step>.damaged (kept, out of the way of a
  new save at its step)."""
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None and step not in steps:
    raise ValueError(
      f"train.restore_step={step}: no such checkpoint in {manager.directory} (it has {steps})."
    )
  for candidate in [step] if step is not None else steps:
    try:
      return candidate, restore_step(candidate)
    except IncompatibleCheckpoint:
      raise
    except Exception as e:  # what Orbax and TensorStore raise on damaged files varies
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
      if step is not None:
        raise ValueError(
          f"train.restore_step={step}: checkpoint {manager.directory / str(step)} cannot be "
          f"restored ({reason}); pick another step."
        ) from None
      damaged = manager.directory / str(candidate)
      if set_aside_damaged:
        if jax.process_index() == 0:
          damaged.rename(damaged.parent / f"{candidate}.damaged")
        multihost_utils.sync_global_devices("checkpoint set aside")
        manager.reload()
      logging.warning(
        "checkpoint %s cannot be restored (%s)%s; trying the one before it.",
        damaged,
        reason,
        f": moved to {candidate}.damaged" if set_aside_damaged else "",
      )
  if steps:
    raise ValueError(
      f"none of the checkpoints {steps} in {manager.directory} can be restored (see the log); "
      "move them away or use another --workdir."
    )
  return None, None


def restore(manager: ocp.CheckpointManager, abstract_state, shardings, step=None, convert=None):
  """The state at `step` (default: the newest checkpoint that restores; damaged ones are set aside),
  placed on `shardings`; None when there is no checkpoint. The data iterator is positioned from
  the restored state["step"] (see the module docstring).

  `convert`: the model's `convert_layout` where it has two parameter layouts (DiM's
  `model.stack_blocks`); a checkpoint written in the other one is restored through it."""
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )

  def restore_step(candidate):
    def read(stored_target):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(stored_target))
      return manager.restore(candidate, args=args)["state"]

    if _other_layout(manager, candidate, abstract_state["params"], convert):
      return _restore_converted(manager, candidate, target, convert, read)
    check_compatible(manager, candidate, abstract_state["params"])
    return read(target)

  step, state = _first_restorable(manager, restore_step, step, set_aside_damaged=True)
  if step is not None:
    logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  return state


def _other_layout(manager, step: int, abstract_params, convert) -> bool:
  """Whether the checkpoint holds the parameters in the model's other layout (names differ)."""
  stored = _shapes(manager.item_metadata(step)["state"].tree["params"])
  return convert is not None and set(stored) != set(_shapes(abstract_params))


def _restore_converted(manager, step: int, target: dict, convert, read) -> dict:
  """`target` (parts of the state, as ShapeDtypeStructs with shardings) from a checkpoint of the
  other parameter layout: `read(stored_target)` restores each stored array onto the sharding of
  its part of this model's array (a stacked "layers" axis whole); converted on the devices."""
  theirs = convert(_shapes_to_arrays(target), stack=_stacked_target, take=_slice_target)
  prefix = "params/" if "params" in target else "ema_params/"  # the same names in both
  check_compatible(
    manager, step, {n.removeprefix(prefix): x for n, x in theirs.items() if n.startswith(prefix)}
  )
  stored = manager.item_metadata(step)["state"].tree
  stored_target = jax.tree_util.tree_map_with_path(
    lambda p, _: theirs[param_name(p)], {key: stored[key] for key in target}
  )
  arrays = convert(_shapes_to_arrays(read(stored_target)))
  logging.info("Checkpoint %s converted to this model's parameter layout", manager.directory)
  return jax.tree_util.tree_map_with_path(
    lambda p, t: jax.device_put(arrays[param_name(p)], t.sharding), target
  )


def _spec(target: jax.ShapeDtypeStruct) -> tuple:
  spec = tuple(target.sharding.spec)
  return spec + (None,) * (len(target.shape) - len(spec))


def _stacked_target(parts: list) -> jax.ShapeDtypeStruct:
  """The restore target of arrays stacked on a new leading axis, which stays whole."""
  first = parts[0]
  sharding = NamedSharding(first.sharding.mesh, PartitionSpec(None, *_spec(first)))
  return jax.ShapeDtypeStruct((len(parts), *first.shape), first.dtype, sharding=sharding)


def _slice_target(stacked: jax.ShapeDtypeStruct, index: int) -> jax.ShapeDtypeStruct:
  """The restore target of one slice of a stacked array, split as the rest of it is."""
  del index
  sharding = NamedSharding(stacked.sharding.mesh, PartitionSpec(*_spec(stacked)[1:]))
  return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=sharding)


def _partial_restore(manager, step: int, target: dict) -> dict:
  """Only the parts of the state in `target` (ShapeDtypeStructs with their shardings)."""
  args = ocp.args.PyTreeRestore(
    item=target,
    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    partial_restore=True,
  )
  return manager.restore(step, args=ocp.args.Composite(state=args))["state"]


def restore_params(
  workdir: str, abstract_params, shardings, *, use_ema: bool, step=None, convert=None
):  # fmt: skip
  """Only the (EMA) parameters of a workdir's newest restorable checkpoint (or of `step`), read
  straight onto `shardings`: for sampling and evaluation. `convert` as in `restore`."""
  key = "ema_params" if use_ema else "params"
  target = {
    key: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
    )
  }
  manager = _reader(workdir)

  def restore_step(candidate):
    if _other_layout(manager, candidate, abstract_params, convert):
      read = functools.partial(_partial_restore, manager, candidate)
      return _restore_converted(manager, candidate, target, convert, read)[key]
    check_compatible(manager, candidate, abstract_params)
    return _partial_restore(manager, candidate, target)[key]

  step, params = _first_restorable(manager, restore_step, step, set_aside_damaged=False)
  if step is None:
    raise ValueError(
      f"no checkpoint in {workdir}/checkpoints: train first with --mode=train and this --workdir."
    )
  logging.info("Using the %s of step %d", key, step)
  return params, step


def transfer_params(
  workdir: str, abstract_params, shardings, mesh, resize=None, convert=None
):  # fmt: skip
  """Another run's newest weights for this model (stage transitions such as 256² -> 512²).

  Shapes must match, except where the model offers `resize(name, stored) -> array` (DiM: its
  position table, to the new grid). Only the parameters are read, each straight onto its sharding
  here (a parameter to resize, or one of the model's other layout: replicated, then converted by
  `convert` as in `restore`). Returns the parameters placed on `shardings` and a list of what was
  changed, for the log.
  """
  manager = _reader(workdir)
  wanted = {param_name(p): (a, s) for (p, a), s in zip(
    jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(shardings), strict=True
  )}  # fmt: skip
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(path, stored):
    abstract, sharding = wanted.get(param_name(path), (stored, replicated))
    same = tuple(abstract.shape) == tuple(stored.shape)
    return jax.ShapeDtypeStruct(
      stored.shape, stored.dtype, sharding=sharding if same else replicated
    )

  def restore_step(candidate):
    stored = manager.item_metadata(candidate)["state"].tree["params"]
    target = {"params": jax.tree_util.tree_map_with_path(place, stored)}
    return _shapes_to_arrays(_partial_restore(manager, candidate, target)["params"])

  try:
    step, source = _first_restorable(manager, restore_step, None, set_aside_damaged=False)
  except ValueError as e:
    raise ValueError(f"train.init_from={workdir}: {e}") from None
  if step is None:
    raise ValueError(f"train.init_from={workdir}: no checkpoint in {workdir}/checkpoints.")
  changes = [f"weights from {workdir} step {step} (EMA reset to them, optimizer fresh)"]
  if convert is not None and set(source) != set(wanted):
    source = convert(source)
    changes.append("converted to this model's parameter layout")

  def fit(path, abstract):
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

  params = jax.tree_util.tree_map_with_path(fit, abstract_params)
  return jax.device_put(params, shardings), changes


def param_name(path) -> str:
  """ "blocks/0/mixer/in_proj/kernel" for a pytree path into an NNX state or stored metadata."""
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return "/".join(k for k in keys if k != "value")


def _shapes_to_arrays(tree) -> dict:
  return {param_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
