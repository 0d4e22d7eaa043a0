"""Device mesh, logical-axis rules and shardings: the only place that knows the mesh axes.

Modules annotate parameters with logical names ("embed", "mlp", "heads", "vocab"); the config's
`mesh.rules` map them onto the ("data", "fsdp") mesh (by default FSDP-style: over "fsdp" along
"embed"). The batch of inputs and activations is split over both axes.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """Resolves the config's axis sizes (one may be -1) against the device count."""
  sizes = [mesh_config.data, mesh_config.fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh={dict(mesh_config)}: at most one axis may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or num_devices % known:
    raise ValueError(f"mesh={dict(mesh_config)} does not divide the {num_devices} devices.")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh={dict(mesh_config)} uses {np.prod(sizes)} of {num_devices} devices.")
  return tuple(sizes)


def create_mesh(mesh_config) -> jax.sharding.Mesh:
  shape = mesh_shape(mesh_config, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules):
  """NamedShardings for a pytree of NNX states, their logical axes mapped by `rules` (the config's
  `mesh.rules`: (logical name, mesh axes or None) pairs), and plain arrays (replicated)."""
  for name, axes in rules:
    if not set((axes,) if isinstance(axes, str) else axes or ()) <= set(mesh.axis_names):
      raise ValueError(
        f"mesh.rules maps {name!r} to {axes!r}: use axes of {mesh.axis_names}, or None."
      )
  variables = jax.tree.leaves(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  used = {
    a
    for v in variables
    if isinstance(v, nnx.Variable)
    for a in v.get_metadata().get("out_sharding") or ()
  }
  unmapped = sorted(used - {None} - {name for name, _ in rules})
  if unmapped:
    raise ValueError(
      f"mesh.rules has no rule for the logical axis {unmapped[0]!r} of the parameters: add "
      f"({unmapped[0]!r}, None) to keep it whole, or name the mesh axes to split it over."
    )
  with nnx.logical_axis_rules(rules):
    return nnx.get_named_sharding(abstract_state, mesh)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _batch_shards(batch: int) -> int:
  """How many ways the current mesh (`jax.set_mesh`) splits a batch of this size over BATCH_AXES;
  1 without a mesh or when the batch does not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return 1
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  return shards if batch % shards == 0 else 1


def shard_batch(x: jax.Array) -> jax.Array:
  """x constrained to rows split over BATCH_AXES, other dimensions whole (no-op without a mesh).

  Activations need this hint: with parameters split over "fsdp" along their input dimension,
  the partitioner otherwise may contract the split dimension and all-reduce full-batch
  activations instead of gathering the (much smaller) weights (seen in the compiled DiM step)."""
  if _batch_shards(x.shape[0]) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))


def map_batch_shards(fn, batched: tuple, replicated: tuple):
  """fn(*batched, *replicated), run shard by shard when a mesh is set (`jax.set_mesh`) and the
  batch divides over BATCH_AXES: `batched` arrays (or None) split along their leading batch
  dimension, `replicated` whole on every device, the result split like `batched`.

  For opaque kernels (Pallas calls): the partitioner cannot split them, so without this it
  gathers the whole batch onto every device and each computes all of it (measured: DiM-H/2 on
  2 H200s asked for 103 GiB per GPU, 27 GiB on one)."""
  if _batch_shards(batched[0].shape[0]) == 1:
    return fn(*batched, *replicated)
  split, whole = PartitionSpec(BATCH_AXES), PartitionSpec()
  return jax.shard_map(
    fn,
    in_specs=(*(split,) * len(batched), *(whole,) * len(replicated)),
    out_specs=split,
    check_vma=False,  # Pallas calls carry no varying-axes annotations
  )(*batched, *replicated)


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Host-local NumPy batch (this process's rows) -> global jax.Arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def local_rows(mesh: jax.sharding.Mesh, global_batch_size: int) -> tuple[int, int]:
  """Rows [start, stop) of each global batch that this process's devices hold: what its input
  pipeline reads (data.create_train_iterator's `rows`)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  spans = {index[0].indices(global_batch_size)[:2] for index in index_map.values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(
      f"process {jax.process_index()} holds rows {sorted(spans)} of the batch, not one block: "
      "order the mesh's devices by process (jax.make_mesh does)."
    )
  return start, stop


def check_batch_divides(global_batch_size: int, mesh: jax.sharding.Mesh, accum: int = 1) -> None:
  """Each device must get whole examples, in every micro-batch."""
  devices = mesh.devices.size
  if accum < 1 or global_batch_size % (devices * accum) or global_batch_size % jax.process_count():
    raise ValueError(
      f"train.batch_size={global_batch_size} does not divide over {devices} devices in "
      f"{jax.process_count()} processes and {accum} micro-batches (train.grad_accum_steps); "
      f"use a multiple of {devices * max(accum, 1)}."
    )
