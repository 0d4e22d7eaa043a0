"""DiM's two block layouts (`model.stack_blocks`): the same model, weights and gradients; the
stacked axis kept whole by the sharding rules; a checkpoint of either layout restores into the
other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax import checkpoint, parallel, train_state
from dim_jax.configs import common, demo
from dim_jax.models import create_model, layout
from dim_jax.models.dim_blocks import block_places


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _model_config(stack: bool, depth: int, **overrides):
  cfg = common.base_config().model
  cfg.update(width=16, depth=depth, input_size=8, in_channels=3, num_classes=4, d_state=2)
  cfg.update(stack_blocks=stack, **overrides)
  cfg.scan.impl = "reference"
  return cfg


def _flat(tree) -> dict:
  return {checkpoint.param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_block_places_by_hand():
  """Depth 21: encoder blocks 1..10, two groups of 4 and 2 left over; decoder block i mirrors
  encoder block 21 - i."""
  places = block_places(21)
  assert places[0] == ("stem", None)
  assert places[1] == ("encoder/0", 0) and places[4] == ("encoder/3", 0)
  assert places[5] == ("encoder/0", 1) and places[8] == ("encoder/3", 1)
  assert places[9] == ("encoder_rest/0", None) and places[10] == ("encoder_rest/1", None)
  assert places[11] == ("decoder_rest/1", None) and places[12] == ("decoder_rest/0", None)
  assert places[13] == ("decoder/3", 1) and places[16] == ("decoder/0", 1)
  assert places[17] == ("decoder/3", 0) and places[20] == ("decoder/0", 0)
  assert len(set(places.values())) == 21
  # Depth 13 makes one group: too few to stack, every block is held as one.
  assert all(h is None for _, h in block_places(13).values())


@pytest.mark.parametrize("directions", [4, 2])
def test_stacked_blocks_scan_in_the_scheduled_directions(directions):
  cfg = _model_config(True, 21, scan_directions=directions)
  blocks = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0))).blocks
  schedule = layout.scan_schedule(21, directions)
  for i, (where, _) in block_places(21).items():
    block = blocks.stem if where == "stem" else getattr(blocks, where.split("/")[0])
    block = block if where == "stem" else block[int(where.split("/")[1])]
    assert block.pattern == schedule[i], (i, where)
    assert (block.skip_fusion is not None) == (i > 10), (i, where)


def test_stacked_model_equals_unstacked_on_the_same_weights():
  """Depth 21 (2 scanned groups each side, 2 blocks left over): random weights in the unstacked
  layout, converted; outputs and every gradient agree. The stacked one rematerialises its blocks
  inside the scan, the unstacked one keeps everything."""
  rng, seed = _rng()
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  t, y = jnp.asarray(rng.uniform(0, 999, size=2), jnp.float32), jnp.array([1, 4])
  plain = create_model(_model_config(False, 21), nnx.Rngs(0))
  stacked = create_model(_model_config(True, 21, remat="block"), nnx.Rngs(0))
  graphdef, params = nnx.split(plain)
  stacked_graphdef, stacked_params = nnx.split(stacked)
  # The same seed gives the same weights in both layouts.
  for name, value in stacked.convert_layout(_flat(params)).items():
    np.testing.assert_array_equal(value, _flat(stacked_params)[name], err_msg=name)
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype), params)
  converted = stacked.convert_layout(_flat(params))
  stacked_params = jax.tree_util.tree_map_with_path(
    lambda p, _: converted[checkpoint.param_name(p)], stacked_params
  )

  def loss_and_grads(graphdef, params):
    def loss(params):
      out = nnx.merge(graphdef, params)(x, t, y)
      return jnp.sum(out**2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (want_loss, want_out), want_grads = loss_and_grads(graphdef, params)
  (got_loss, got_out), got_grads = loss_and_grads(stacked_graphdef, stacked_params)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
  got_grads = stacked.convert_layout(_flat(got_grads))  # back to the unstacked names
  want_grads = _flat(want_grads)
  assert set(got_grads) == set(want_grads)
  assert max(float(jnp.abs(g).max()) for g in want_grads.values()) > 0
  for name, want in want_grads.items():
    scale = float(jnp.abs(want).max()) + 1e-6
    np.testing.assert_allclose(
      got_grads[name], want, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name}, seed {seed}"
    )


def test_stacked_parameters_keep_the_layers_axis_whole():
  cfg = _model_config(True, 17)
  params = nnx.state(nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0))))
  mesh = parallel.create_mesh(common.base_config().mesh)
  rules = common.base_config().mesh.rules
  shardings = parallel.state_shardings(params, mesh, rules)
  kernel = shardings["blocks"]["encoder"][0]["mixer"]["in_proj"]["kernel"]  # (G, D, 2E)
  assert tuple(kernel.spec) == (None, "fsdp", None)
  without_layers = tuple(r for r in rules if r[0] != "layers")
  with pytest.raises(ValueError, match="no rule for the logical axis 'layers'.*'layers', None"):
    parallel.state_shardings(params, mesh, without_layers)


def _random_state(stack: bool, rng):
  c = demo.get_config()
  c.model.update(width=16, depth=21, patch_size=4, d_state=2, stack_blocks=stack)
  graphdef, init_state, _, _ = train_state.build_state(c)
  abstract = jax.eval_shape(init_state)
  state = jax.tree.map(
    lambda a: (
      jnp.asarray(rng.normal(size=a.shape), a.dtype)
      if jnp.issubdtype(a.dtype, jnp.floating)
      else jnp.full(a.shape, 3, a.dtype)
    ),
    abstract,
  )
  mesh = parallel.create_mesh(c.mesh)
  shardings = parallel.state_shardings(abstract, mesh, c.mesh.rules)
  model = nnx.merge(graphdef, abstract["params"])
  return state, abstract, shardings, mesh, model


@pytest.mark.parametrize("saved_stacked", [False, True])
def test_checkpoint_of_one_layout_restores_into_the_other(tmp_path, saved_stacked):
  """The whole train state (parameters, Adam moments, EMA) saved in one layout, restored into a
  model of the other: equal to the saved one converted. Also as a stage transition's weights."""
  rng, seed = _rng()
  saved, *_ = _random_state(saved_stacked, rng)
  manager = checkpoint.create_manager(str(tmp_path))
  checkpoint.save(manager, 3, saved, force=True)
  manager.wait_until_finished()
  _, abstract, shardings, mesh, model = _random_state(not saved_stacked, rng)
  with pytest.raises(ValueError, match="different model"):  # without the model's conversion
    checkpoint.restore(manager, abstract, shardings)
  restored = checkpoint.restore(manager, abstract, shardings, convert=model.convert_layout)
  want = model.convert_layout(_flat(saved))
  got = _flat(restored)
  assert set(got) == set(want) == set(_flat(abstract))
  for name, value in got.items():
    np.testing.assert_array_equal(value, want[name], err_msg=f"{name}, seed {seed}")
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)

  params, changes = checkpoint.transfer_params(
    str(tmp_path), abstract["params"], shardings["params"], mesh, convert=model.convert_layout
  )
  for name, value in _flat(params).items():
    np.testing.assert_array_equal(value, want[f"params/{name}"], err_msg=name)
  assert any("layout" in c for c in changes)
  ema, step = checkpoint.restore_params(
    str(tmp_path),
    abstract["params"],
    shardings["params"],
    use_ema=True,
    convert=model.convert_layout,
  )  # as sampling reads them
  assert step == 3
  for name, value in _flat(ema).items():
    np.testing.assert_array_equal(value, want[f"ema_params/{name}"], err_msg=name)
