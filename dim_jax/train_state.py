"""The training state and how it is built and restored: train, sample, evaluate and the
benchmarks all start here.

  state = {"step": int32, "params": nnx.State, "opt_state": optax state, "ema_params": nnx.State}

`build_state(config)` gives the model's graph, a function that initialises the state, the optimizer
and its learning-rate schedule; `restore_for_sampling` the (EMA) parameters of a workdir's latest
checkpoint.
"""

import jax
import jax.numpy as jnp
import optax
from absl import logging
from clu import parameter_overview
from flax import nnx

from dim_jax import checkpoint, parallel
from dim_jax.models import create_model


def weight_decay_mask(params, weight_decay_on: str):
  """Which parameters AdamW decays: all (the official code) or only matrices (rank >= 2)."""
  if weight_decay_on == "all":
    return None
  if weight_decay_on == "matrices":
    return jax.tree.map(lambda p: p.ndim >= 2, params)
  raise ValueError(f"optim.weight_decay_on={weight_decay_on!r}: use 'all' or 'matrices'.")


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warm-up, then constant (the official schedule) or a cosine decay to 0 at num_steps."""
  c = optim_config
  warmup = max(c.warmup_steps, 1)
  if c.decay == "constant":
    return optax.warmup_constant_schedule(0.0, c.learning_rate, warmup)
  if c.decay == "cosine":
    # optax wants at least one step of decay after the warm-up (a 0-step run builds one too).
    end = max(num_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, end)
  raise ValueError(f"optim.decay={c.decay!r}: use 'constant' or 'cosine'.")


def create_optimizer(optim_config, params, num_steps: int) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, on `learning_rate_schedule`."""
  c = optim_config
  lr = learning_rate_schedule(c, num_steps)
  adamw = optax.adamw(
    lr,
    b1=c.b1,
    b2=c.b2,
    eps=c.eps,
    weight_decay=c.weight_decay,
    mask=weight_decay_mask(params, c.weight_decay_on),
  )
  clip = optax.clip_by_global_norm(c.grad_clip_norm) if c.grad_clip_norm > 0 else optax.identity()
  return optax.chain(clip, adamw), lr


def build_state(config):
  """The model's graph, an init function for the train state, the optimizer and its schedule."""
  abstract_model = nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model)
  tx, lr_schedule = create_optimizer(config.optim, abstract_params, config.train.num_steps)
  num_params = parameter_overview.count_parameters(nnx.to_pure_dict(abstract_params))
  logging.info("Model %s: %.2f M parameters", config.model.name, num_params / 1e6)

  def init_state():
    _, params = nnx.split(create_model(config.model, nnx.Rngs(config.seed)))
    return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema_params": jax.tree.map(jnp.copy, params),
    }

  return graphdef, init_state, tx, lr_schedule


def restore_for_sampling(config, workdir: str):
  """(graphdef, EMA or raw parameters, step) of a workdir's newest checkpoint that restores."""
  mesh = parallel.create_mesh(config.mesh)
  graphdef, init_state, _, _ = build_state(config)
  abstract_state = jax.eval_shape(init_state)
  shardings = parallel.state_shardings(abstract_state, mesh, config.mesh.rules)
  model = nnx.merge(graphdef, abstract_state["params"])  # shapes only: for its methods
  params, step = checkpoint.restore_params(
    workdir,
    abstract_state["params"],
    shardings["params"],
    use_ema=config.sample.use_ema,
    convert=getattr(model, "convert_layout", None),  # checkpoints of the other block layout
  )
  return graphdef, params, step
