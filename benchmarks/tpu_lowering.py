"""The DiM train step built for a TPU pod slice on this (CPU) host: memory per chip without a TPU.

The step is the recipe's (`configs/pretrain_256.py` by default: DiM-H/2, batch 768, bf16, block
remat, FSDP over every chip) with the Pallas TPU scan, jitted with the recipe's shardings on a
mesh of `--topology` chips, as train.py does on a pod:

  with libtpu   the chips are compile-only TPU devices of that topology (`jax.experimental.
                topologies`, no TPU needed) and the step is compiled by XLA:TPU and Mosaic; the
                compiler's own per-chip figures are printed (arguments = parameters, optimizer
                state, EMA and the batch shard; temporaries = activations and workspace);
  without it    the step is only lowered for the `tpu` platform (StableHLO with the Mosaic kernels
                embedded) on an abstract mesh, and the per-chip bytes of the train state are
                counted from its shardings.

libtpu: `make venv` installs the one jax[tpu] pins into .venv/tpu-compiler; or point
TPU_LIBRARY_PATH at any libtpu.so. It is loaded only to compile, never as a backend.

  python -m benchmarks.tpu_lowering                               # DiM-H/2 256², v5p-128
  python -m benchmarks.tpu_lowering --topology=v5p:2x2x1 --image=512 --batch=32
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding, PartitionSpec

from configs import pretrain_256
from dim_jax import diffusion, parallel, train, train_state

GIB = 2**30


def libtpu_path() -> str | None:
  """libtpu.so from TPU_LIBRARY_PATH or `make venv`'s .venv/tpu-compiler; None if neither."""
  path = os.environ.get("TPU_LIBRARY_PATH") or os.path.join(
    sys.prefix, "tpu-compiler", "libtpu", "libtpu.so"
  )  # fmt: skip
  return path if os.path.isfile(path) else None


def compile_only_devices(topology: str):
  """The chips of a TPU topology ("v5p:4x4x4", "v5e:2x2", "v6e:2x2", "v4:2x2x1") as compile-only
  devices, or None when libtpu is missing."""
  path = libtpu_path()
  if path is None:
    return None
  os.environ["TPU_LIBRARY_PATH"] = path  # read when the plugin loads, after the CPU backend
  # No TPU is opened, so processes need not take turns (libtpu otherwise holds a lock file).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def tpu_mesh(mesh_config, topology: str, num_chips: int, compile: bool = True):
  """(mesh over the topology's chips, compiles?): concrete compile-only devices with libtpu (and
  `compile`), else an abstract mesh of TPU devices of that generation (enough to lower)."""
  devices = compile_only_devices(topology) if compile else None
  shape = parallel.mesh_shape(mesh_config, num_chips)
  axis_types = (AxisType.Auto,) * len(parallel.MESH_AXES)
  if devices is not None:
    grid = np.asarray(devices[:num_chips]).reshape(shape)
    return jax.sharding.Mesh(grid, parallel.MESH_AXES, axis_types=axis_types), True
  kind, cores = {  # device kind and TensorCores per device (megacore: 2)
    "v4": ("TPU v4", 2), "v5e": ("TPU v5 lite", 1), "v5p": ("TPU v5", 2), "v6e": ("TPU v6 lite", 1)
  }[topology.split(":")[0]]  # fmt: skip
  device = AbstractDevice(device_kind=kind, num_cores=cores, platform="tpu")
  mesh = AbstractMesh(shape, parallel.MESH_AXES, axis_types=axis_types, abstract_device=device)
  return mesh, False


def compile_for_tpu(lowered):
  """`lowered.compile()` without the persistent compilation cache: an executable compiled for
  compile-only devices cannot be loaded back from it (jax warns on every later read)."""
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return lowered.compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)


def train_step_for_tpu(config, mesh, compiles: bool):
  """The recipe's train step traced with its shardings on `mesh` and lowered for TPU: the
  `Lowered` and the abstract train state (with shardings)."""
  graphdef, init_state, tx, lr = train_state.build_state(config)
  abstract = jax.eval_shape(init_state)
  shardings = parallel.state_shardings(abstract, mesh, config.mesh.rules)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )  # fmt: skip
  rows = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
  size, batch = config.model.input_size, config.train.batch_size
  images = (batch, size, size, config.model.in_channels)
  batch_in = {
    "image": jax.ShapeDtypeStruct(images, jnp.float32, sharding=rows),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
  }
  step = train.make_train_step(
    config, graphdef, tx, lr, diffusion.create_schedule(config.diffusion)
  )
  jitted = jax.jit(step, donate_argnums=(0,))
  if compiles:
    with jax.set_mesh(mesh):  # the Pallas scan runs per batch shard, as in train.py
      return jitted.trace(state, batch_in).lower(), state
  with jax.sharding.use_abstract_mesh(mesh):
    return jitted.trace(state, batch_in).lower(lowering_platforms=("tpu",)), state


def kernel_rows(lowered_text: str) -> list[int]:
  """The leading (batch) size of the first operand of each Mosaic kernel call in a lowering."""
  calls = [line for line in lowered_text.splitlines() if "custom_call @tpu_custom_call" in line]
  return [int(line.split(": (tensor<", 1)[1].split("x", 1)[0]) for line in calls]


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
  return sum(
    int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree)
  )


def report(config, topology: str, num_chips: int) -> dict:
  mesh, compiles = tpu_mesh(config.mesh, topology, num_chips)
  t0 = time.perf_counter()
  lowered, state = train_step_for_tpu(config, mesh, compiles)
  rows = kernel_rows(lowered.as_text())
  out = dict(
    lower_s=time.perf_counter() - t0,
    mosaic_kernels=len(rows),
    kernel_rows=sorted(set(rows)),
    params_gib=per_chip_bytes(state["params"]) / GIB,
    state_gib=per_chip_bytes(state) / GIB,
  )
  if compiles:
    t0 = time.perf_counter()
    mem = compile_for_tpu(lowered).memory_analysis()
    out.update(
      compile_s=time.perf_counter() - t0,
      arguments_gib=mem.argument_size_in_bytes / GIB,
      temp_gib=mem.temp_size_in_bytes / GIB,
      output_gib=mem.output_size_in_bytes / GIB,
      aliased_gib=mem.alias_size_in_bytes / GIB,
    )
  return out


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", default="v5p:4x4x4", help="TPU generation:chip grid")
  p.add_argument("--chips", type=int, default=None, help="chips used (default: all)")
  p.add_argument("--variant", default="H/2")
  p.add_argument("--image", type=int, default=256, help="image side; latents are image / 8")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the recipe's)")
  args = p.parse_args(argv)
  dims = [int(x) for x in args.topology.split(":")[1].split("x")]
  chips = args.chips or int(np.prod(dims))
  config = pretrain_256.get_config()
  config.model.update(variant=args.variant, input_size=args.image // 8)
  config.model.scan.impl = "pallas_tpu"
  if args.batch:
    config.train.batch_size = args.batch
  print(
    f"DiM-{args.variant} at {args.image}², batch {config.train.batch_size}, {chips} chips of "
    f"{args.topology}, mesh {dict(config.mesh)}; libtpu: {libtpu_path() or 'absent'}"
  )
  out = report(config, args.topology, chips)
  print(
    f"lowered in {out['lower_s']:.1f} s, {out['mosaic_kernels']} Mosaic kernel calls, each on "
    f"{out['kernel_rows']} rows of the batch (its chip's)"
  )
  print(f"per chip: parameters {out['params_gib']:.2f} GiB, train state (parameters, AdamW, EMA, "
        f"step) {out['state_gib']:.2f} GiB")  # fmt: skip
  if "temp_gib" in out:
    print(f"compiled in {out['compile_s']:.1f} s; per chip (XLA:TPU): arguments "
          f"{out['arguments_gib']:.2f} GiB, temporaries (activations, workspace) "
          f"{out['temp_gib']:.2f} GiB, outputs {out['output_gib']:.2f} GiB (donated "
          f"{out['aliased_gib']:.2f})")  # fmt: skip
  else:
    print(
      "activation memory needs the compiler: install libtpu (make venv) or set TPU_LIBRARY_PATH"
    )


if __name__ == "__main__":
  main(sys.argv[1:])
