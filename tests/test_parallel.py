"""Sharding and fault tolerance on fake CPU devices: one device equals eight, a checkpoint saved on
one mesh restores on another, and a run killed with SIGKILL resumes to the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "train_and_dump.py")


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _train(workdir, steps, devices, data, fsdp, out, **popen):
  args = [sys.executable, DRIVER, str(workdir), str(steps), str(data), str(fsdp), str(out)]
  if popen:
    return subprocess.Popen(args, env=_env(devices), cwd=REPO, **popen)
  result = subprocess.run(args, env=_env(devices), cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(out))


def _params(dump):
  return {k: v for k, v in dump.items() if k not in ("step", "devices")}


def test_eight_devices_match_one(tmp_path):
  one = _train(tmp_path / "one", 3, 1, 1, 1, tmp_path / "one.npz")
  eight = _train(tmp_path / "eight", 3, 8, 2, 4, tmp_path / "eight.npz")
  assert int(eight["devices"]) == 8 and int(one["step"]) == int(eight["step"]) == 3
  # Only the order of the batch reductions differs; Adam's first steps move each weight by about
  # the learning rate (1e-3), so differences of fp32 rounding stay orders of magnitude below it.
  for name, value in _params(one).items():
    np.testing.assert_allclose(eight[name], value, rtol=0, atol=2e-5, err_msg=name)


def test_checkpoint_saved_on_eight_devices_restores_on_four(tmp_path):
  saved = _train(tmp_path / "run", 2, 8, 2, 4, tmp_path / "saved.npz")
  restored = _train(tmp_path / "run", 2, 4, 1, 4, tmp_path / "restored.npz")  # nothing to train
  assert int(restored["devices"]) == 4 and int(restored["step"]) == 2
  for name, value in _params(saved).items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
  straight = _train(tmp_path / "straight", 16, 1, 1, 1, tmp_path / "straight.npz")
  work = tmp_path / "killed"
  proc = _train(
    work, 16, 1, 1, 1, tmp_path / "unused.npz", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 240
  while time.time() < deadline and not (work / "checkpoints" / "4").exists():
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert (work / "checkpoints" / "4").exists(), "no checkpoint appeared before the kill"
  assert not (work / "checkpoints" / "16").exists(), "the run finished before it was killed"
  resumed = _train(work, 16, 1, 1, 1, tmp_path / "resumed.npz")
  for name, value in _params(straight).items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)


SHARDED_SCAN = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dim_jax import parallel
from dim_jax.ops import ScanConfig, selective_scan

mesh = jax.make_mesh((2, 4), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
rng = np.random.default_rng(int.from_bytes(__import__("os").urandom(4), "little"))
u, delta, z = (jnp.asarray(rng.normal(size=(8, 11, 40)), jnp.float32) for _ in range(3))
B, C = (jnp.asarray(rng.normal(size=(8, 11, 3)), jnp.float32) for _ in range(2))
A = -jnp.exp(jnp.asarray(rng.normal(size=(40, 3)), jnp.float32))
D, bias = (jnp.asarray(rng.normal(size=40), jnp.float32) for _ in range(2))

def loss(u, delta, A, B, C, D, bias, z):
  y = selective_scan(u, delta, A, B, C, D, delta_bias=bias, z=z, config=ScanConfig("pallas_gpu"))
  return jnp.sum(jnp.sin(y))

fn = jax.jit(jax.value_and_grad(loss, argnums=range(8)))
args = (u, delta, A, B, C, D, bias, z)
want = fn(*args)
rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
sharded = [jax.device_put(x, rows) if x.ndim == 3 else x for x in args]
with jax.set_mesh(mesh):
  assert "shard_map" in str(jax.make_jaxpr(fn)(*sharded))
  got = fn(*sharded)
for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  err = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
  assert err < 1e-5, err
print("ok")
"""


def test_fused_scan_runs_per_batch_shard_under_a_mesh():
  """On 8 devices with jax.set_mesh, the Pallas scan runs inside a shard_map over the batch (an
  opaque kernel would otherwise be gathered whole onto every device), with the value and all
  gradients of the unsharded call (replicated A, D, bias: summed over the shards)."""
  result = subprocess.run(
    [sys.executable, "-c", SHARDED_SCAN], env=_env(8), cwd=REPO, capture_output=True, text=True
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


NO_GATHERED_ACTIVATIONS = """
import re
import jax, jax.numpy as jnp
from benchmarks import train_step

c = train_step.config_for("S/2", 256, 4, "block", "reference", tiny=True)
c.model.update(width=64, depth=3)
c.mesh.update(data=2, fsdp=2)
step, init_state, state_sharding, rows, mesh = train_step.sharded_step(c)
n = c.train.batch_size
batch = {"image": jax.ShapeDtypeStruct((n, 32, 32, 4), jnp.float32, sharding=rows),
         "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows)}
state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     jax.eval_shape(init_state), state_sharding)
with jax.set_mesh(mesh):
  hlo = step.lower(state, batch).compile().as_text()
ops = re.findall(r"= (\\S+) (all-gather|all-reduce|reduce-scatter|all-to-all)\\(", hlo)
assert any(op == "all-gather" for _, op in ops), "expected the FSDP weight gathers"
tokens = 366  # 16 x 16 patches with pads and prefix, as the 256² model
activations = (f"{n},{tokens},", f"{n},16,16,")  # (B, L, ...) and the (B, h, w, D) patch grid
bad = [shape for shape, _ in ops if shape.split("[")[1].startswith(activations)]
assert not bad, bad
print("ok")
"""


def test_train_step_moves_weights_not_activations():
  """The compiled DiM step on a 2 x 2 (data x fsdp) mesh: collectives gather weights; none
  carries a full-batch activation (B, L, ...), which the partitioner chose before the activations
  were constrained to batch rows (it OOMed DiM-H/2 on 2 GPUs), nor the (B, h, w, D) grid around
  the depth-wise convs, which it gathered whole while their weights were split by channel."""
  result = subprocess.run(
    [sys.executable, "-c", NO_GATHERED_ACTIVATIONS], env=_env(4), cwd=REPO, capture_output=True,
    text=True,
  )  # fmt: skip
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_parameter_shardings_follow_the_config_rules():
  """`mesh.rules` decide the split: FSDP along "embed" by default, any other mapping by config,
  and a rule naming an axis the mesh lacks is refused naming the field."""
  import pytest
  from flax import nnx

  from configs import common
  from dim_jax import parallel
  from dim_jax.models import create_model

  config = common.apply_arg(common.base_config(), "smoke")
  params = nnx.state(nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(0))))
  mesh = parallel.create_mesh(config.mesh)

  def in_proj_spec(rules):
    shardings = parallel.state_shardings(params, mesh, rules)
    return tuple(shardings["blocks"][0]["mixer"]["in_proj"]["kernel"].spec)  # ("embed", "mlp")

  assert in_proj_spec(config.mesh.rules) == ("fsdp", None)
  tensor_parallel = (("embed", None), ("mlp", ("data", "fsdp")), ("heads", None), ("vocab", None))
  assert in_proj_spec(tensor_parallel) == (None, ("data", "fsdp"))
  with pytest.raises(ValueError, match="mesh.rules maps 'mlp' to 'model'"):
    parallel.state_shardings(params, mesh, (("mlp", "model"),))
