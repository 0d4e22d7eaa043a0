"""The DiM backbone: parameter counts of the presets, the Mamba mixer's maths, any grid size."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax.configs import common
from dim_jax.models import create_model
from dim_jax.models.layers import block_caller
from dim_jax.models.mamba import MambaMixer
from dim_jax.ops import ScanConfig


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _model_config(**overrides):
  cfg = common.base_config().model
  cfg.update(**overrides)
  cfg.scan.impl = "reference"
  return cfg


@pytest.mark.parametrize(
  "variant, in_channels, input_size, num_classes, expected",
  [
    ("S/2", 3, 32, 10, 50.6e6),  # CIFAR-10 pixels
    ("L/2", 4, 32, 1000, 386e6),  # ImageNet 256² latents
    ("H/2", 4, 32, 1000, 862e6),
  ],
)
def test_preset_parameter_counts(variant, in_channels, input_size, num_classes, expected):
  cfg = _model_config(
    variant=variant, in_channels=in_channels, input_size=input_size, num_classes=num_classes
  )
  model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0)))  # no allocation
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(count - expected) / expected < 0.01, f"{variant}: {count / 1e6:.2f} M"


def _mixer_by_hand(x, p, d_state, dt_rank):
  """Mamba-1 forward in float64 NumPy, sequential in time (mamba_simple.py semantics)."""
  silu = lambda v: v / (1 + np.exp(-v))
  softplus = lambda v: np.log1p(np.exp(v))
  xz = x @ p["in_proj"]
  inner = xz.shape[-1] // 2
  xi, z = xz[..., :inner], xz[..., inner:]
  k = p["conv_w"].shape[0]  # kernel (k, 1, E)
  padded = np.pad(xi, ((0, 0), (k - 1, 0), (0, 0)))
  conv = sum(padded[:, j : j + xi.shape[1]] * p["conv_w"][j, 0] for j in range(k)) + p["conv_b"]
  u = silu(conv)
  dbl = u @ p["x_proj"]
  dt = softplus(dbl[..., :dt_rank] @ p["dt_w"] + p["dt_b"])
  b_in, c_in = dbl[..., dt_rank : dt_rank + d_state], dbl[..., dt_rank + d_state :]
  a = -np.exp(p["A_log"])
  batch, length, _ = u.shape
  h = np.zeros((batch, inner, d_state))
  ys = []
  for t in range(length):
    h = np.exp(dt[:, t, :, None] * a) * h + (dt[:, t] * u[:, t])[..., None] * b_in[:, t, None, :]
    ys.append(np.einsum("bdn,bn->bd", h, c_in[:, t]) + p["D"] * u[:, t])
  y = np.stack(ys, 1) * silu(z)
  return y @ p["out_proj"]


def test_mamba_mixer_matches_float64_sequential_reference():
  rng, seed = _rng()
  dim, batch, length = int(rng.integers(8, 24)), 2, int(rng.integers(5, 17))
  mixer = MambaMixer(
    dim, num_layers=3, scan=ScanConfig("reference"), rngs=nnx.Rngs(int(seed % 2**31))
  )
  # Move the dt bias away from its init so that softplus and the bias path are exercised.
  mixer.dt_proj.bias[...] = jnp.asarray(rng.normal(size=mixer.dt_proj.bias.shape), jnp.float32)
  x = rng.normal(size=(batch, length, dim)).astype(np.float32)
  params = {
    "in_proj": mixer.in_proj.kernel[...],
    "conv_w": mixer.conv1d.kernel[...],
    "conv_b": mixer.conv1d.bias[...],
    "x_proj": mixer.x_proj.kernel[...],
    "dt_w": mixer.dt_proj.kernel[...],
    "dt_b": mixer.dt_proj.bias[...],
    "A_log": mixer.A_log[...],
    "D": mixer.D[...],
    "out_proj": mixer.out_proj.kernel[...],
  }
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  expected = _mixer_by_hand(x.astype(np.float64), params, mixer.d_state, mixer.dt_rank)
  got = np.asarray(mixer(jnp.asarray(x)), np.float64)
  err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert err < 1e-5, f"relative error {err:.2e}, seed {seed}"


def test_mamba_init_follows_mamba_and_dim():
  mixer = MambaMixer(64, num_layers=49, rngs=nnx.Rngs(0))
  dt = np.asarray(jax.nn.softplus(mixer.dt_proj.bias[...]))
  assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6  # log-uniform in [1e-3, 0.1]
  assert np.log(dt).std() > 0.5  # spread over the log range, not a constant
  np.testing.assert_allclose(np.exp(mixer.A_log[...][0]), np.arange(1, 17), rtol=1e-6)
  np.testing.assert_array_equal(mixer.D[...], np.ones(128))
  # out_proj: U(±1/√fan_in) / √num_layers, so its largest entry is below that bound.
  bound = 1 / math.sqrt(128) / math.sqrt(49)
  assert np.abs(mixer.out_proj.kernel[...]).max() <= bound
  assert np.abs(mixer.out_proj.kernel[...]).max() > 0.9 * bound


def test_same_parameters_run_at_other_grid_sizes():
  cfg = _model_config(width=32, depth=5, input_size=16, in_channels=3, num_classes=4)
  model = create_model(cfg, nnx.Rngs(0))
  rng, seed = _rng()
  for height, width in [(16, 16), (24, 24), (16, 28)]:
    x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
    out = model(x, jnp.array([3.0, 500.0]), jnp.array([0, 4]))
    assert out.shape == x.shape, f"seed {seed}"
    assert np.isfinite(np.asarray(out)).all(), f"seed {seed}"


def test_bad_input_size_is_refused():
  with pytest.raises(ValueError, match="divisible by model.patch_size"):
    create_model(_model_config(width=32, depth=5, input_size=15), nnx.Rngs(0))


@pytest.mark.parametrize("name", ["dim", "dit"])
def test_remat_policies_give_the_same_gradients(name):
  """model.remat trades memory for recomputation only: every policy's gradients equal the plain
  backward pass's (the weights are perturbed so that the zero-initialised output layers do not
  hide the other gradients)."""
  rng, seed = _rng()
  extra = dict(num_heads=2) if name == "dit" else dict(d_state=4)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  t, y = jnp.array([10.0, 700.0]), jnp.array([1, 4])

  def gradients(remat):
    cfg = _model_config(name=name, width=32, depth=3, input_size=8, num_classes=4, remat=remat)
    cfg.update(**extra)
    graphdef, params = nnx.split(create_model(cfg, nnx.Rngs(0)))
    noise = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: p + 0.05 * noise.normal(size=p.shape).astype(p.dtype), params)

    def loss(p):
      return jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)

    return jax.grad(loss)(params)

  want = jax.tree.leaves(gradients("none"))
  assert max(float(jnp.max(jnp.abs(w))) for w in want) > 0, f"seed {seed}: all gradients zero"
  for remat in ("block", "save_dots", "save_scan") if name == "dim" else ("block", "save_dots"):
    got = jax.tree.leaves(gradients(remat))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"{remat}, seed {seed}")


@pytest.mark.parametrize("remat, forward_kernels", [("block", 2), ("save_scan", 1)])
def test_save_scan_keeps_the_fused_scan_from_running_twice(remat, forward_kernels):
  """A block's backward under remat="block" recomputes its forward, the fused scan's forward
  kernel included; "save_scan" keeps what the scan's backward needs, so the kernel runs once (the
  backward kernel once either way). Counted in the jaxpr of a DiM block's gradient."""
  cfg = _model_config(width=16, depth=3, input_size=8, num_classes=4, d_state=4, remat=remat)
  cfg.scan.impl = "pallas_gpu"  # the Pallas interpreter on a CPU; only traced here
  model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0)))
  graphdef, params = nnx.split(model.blocks[0])
  call = block_caller(remat)

  def loss(params, stream, modulation):
    return jnp.sum(call(nnx.merge(graphdef, params), stream, modulation))

  def kernel_calls(jaxpr) -> list[str]:
    """Names of the Pallas calls in a jaxpr, its sub-jaxprs included."""
    names = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(eqn.params["name"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, tuple | list) else [value]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
            names += kernel_calls(getattr(sub, "jaxpr", sub))
    return names

  stream, modulation = jnp.ones((2, 12, 16)), jnp.zeros((2, 3, 16))
  names = kernel_calls(jax.make_jaxpr(jax.grad(loss))(params, stream, modulation).jaxpr)
  assert names.count("selective_scan_lanes_fwd") == forward_kernels, names
  assert names.count("selective_scan_lanes_bwd") == 1, names


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="model.remat='all'.*save_dots"):
    create_model(_model_config(width=32, depth=3, input_size=8, remat="all"), nnx.Rngs(0))


def test_scan_settings_reach_every_mixer_from_the_command_line():
  """`--config.model.scan.<field>=...` builds one ScanConfig that every block's mixer runs with;
  the config block's defaults are ScanConfig's own."""
  from absl import flags
  from ml_collections import config_flags

  assert ScanConfig(**common.base_config().model.scan) == ScanConfig()
  demo = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
  argv = ["main", f"--config={demo}:smoke", "--config.model.scan.save_every=4"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  model = nnx.eval_shape(lambda: create_model(flag_values.config.model, nnx.Rngs(0)))
  mixers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MambaMixer)]
  assert len(mixers) == flag_values.config.model.depth
  assert {mixer.scan for mixer in mixers} == {ScanConfig(save_every=4)}


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("impl", "cuda", "model.scan.impl='cuda' is unknown; use one of reference,"),
    ("save_every", 0, "model.scan.save_every=0: use an integer >= 1"),
    ("chunk", -1, "model.scan.chunk=-1: use an integer >= 0"),
  ],
)
def test_a_bad_scan_setting_fails_at_model_creation_naming_the_field(field, value, message):
  cfg = _model_config(width=16, depth=3)
  cfg.scan[field] = value
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0)))
