"""Training: one loop, read top to bottom (big_vision style sections).

  Workdir · Mesh · Model & optimizer · Input · Shard · Update step · Checkpoint · Loop · Samples

The state is a plain pytree {"step", "params", "opt_state", "ema_params"} (NNX states for the
parameters), placed on the mesh by `jax.jit` out_shardings and updated by one jitted, donated step.
The step's noise comes from fold_in(seed, step) and step k trains on global batch k, so a resumed
run continues bit for bit, on any number of processes.
"""

import collections
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from dim_jax import (
  checkpoint,
  data,
  diffusion,
  evaluate,
  evaluators,
  files,
  metrics,
  parallel,
  sample,
  train_state,
)


class _StopSignal:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks: save, then exit
  cleanly. A second Ctrl-C stops at once, as Python does by default."""

  def __init__(self):
    self.received = False  # this process got the signal
    self.stopping = False  # all processes agreed to stop at this step
    signal.signal(signal.SIGTERM, self._handle)
    signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self.received = True
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def restore(self) -> None:
    """Python's own handlers again, once the loop is over."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_requested(stop: _StopSignal, step: int, every: int) -> bool:
  """Whether to save and stop now. With several processes the signal reaches them at different
  steps, so they agree (an all-gather every `every` steps) and stop at the same step together."""
  if jax.process_count() == 1:
    stop.stopping = stop.received
  elif step % every == 0:
    flags = multihost_utils.process_allgather(np.array(stop.received))
    stop.stopping = bool(np.any(flags))
  return stop.stopping


def check_train_config(train_config) -> None:
  """Counts that must be positive, checked before anything is written or compiled."""
  c = train_config
  for field, value, least in [
    ("batch_size", c.batch_size, 1),
    ("grad_accum_steps", c.grad_accum_steps, 1),
    ("num_steps", c.num_steps, 0),
    ("log_every", c.log_every, 1),
    ("checkpoint_every", c.checkpoint_every, 1),
    ("keep_checkpoints", c.keep_checkpoints, 1),
    ("keep_every", c.keep_every, 0),
    ("sample_every", c.sample_every, 0),
  ]:
    if value < least:
      raise ValueError(f"train.{field}={value} must be at least {least}.")
  profile_range(c.profile_steps)


def profile_range(profile_steps: str) -> tuple[int, int] | None:
  """train.profile_steps "first:last" -> (first, last), or None when it is ""."""
  if not profile_steps:
    return None
  try:
    first, last = (int(x) for x in profile_steps.split(":"))
  except ValueError:
    first = last = 0
  if not 1 <= first <= last:
    raise ValueError(
      f"train.profile_steps={profile_steps!r}: give 'first:last' steps, e.g. '100:105' (1 <= "
      "first <= last), or '' for no trace."
    )
  return first, last


def _eta(seconds: float) -> str:
  seconds = int(seconds)
  return (
    f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    if seconds >= 3600
    else f"{seconds // 60}m{seconds % 60:02d}s"
  )


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The EMA's decay for the update after `step` updates: min(decay, (1 + step) / (10 + step)).

  With a fixed decay d the EMA starts from the initial weights and still holds d^t of them after t
  steps (0.92 after 829 steps at the paper's 0.9999), so a short run's EMA samples show the
  initialisation. The warm-up (TensorFlow's ExponentialMovingAverage with num_updates) averages
  over a window of about t / 9 recent steps and reaches d after about 9 / (1 - d) steps. Bias
  correction (optax.ema(debias=True)) was the alternative; it weighs every step since the first
  alike until t ~ 1 / (1 - d), so a run shorter than that averages in its early, poor weights.
  Depends only on the step, so a resumed run continues bit for bit.
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(config, graphdef, tx, lr_schedule, schedule):
  """(state, batch) -> (state, metrics): ε-MSE gradients (accumulated over
  `train.grad_accum_steps` micro-batches), clipped AdamW, EMA. Noise from fold_in(seed, step)."""
  null_label = config.model.num_classes
  ema_decay = config.optim.ema_decay
  accum = config.train.grad_accum_steps
  base_rng = jax.random.key(config.seed)

  def loss_and_grads(params, images, labels, rng):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return diffusion.training_loss(
        model,
        schedule,
        images,
        labels,
        rng,
        p_uncond=config.diffusion.p_uncond,
        null_label=null_label,
      )

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    params = state["params"]
    if accum == 1:
      (loss, step_metrics), grads = loss_and_grads(params, batch["image"], batch["label"], rng)
    else:  # micro-batches in sequence (each with its own noise); gradients averaged
      micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

      def add(carry, xs):
        i, mb = xs
        out = loss_and_grads(params, mb["image"], mb["label"], jax.random.fold_in(rng, i))
        return jax.tree.map(lambda c, o: c + o / accum, carry, out), None

      zeros = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(loss_and_grads, params, micro["image"][0], micro["label"][0], rng),
      )
      ((loss, step_metrics), grads), _ = jax.lax.scan(add, zeros, (jnp.arange(accum), micro))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    ema = optax.tree.update_moment(
      params, state["ema_params"], ema_decay_at(state["step"], ema_decay), order=1
    )
    # What the loop checks before it saves this state: its parameters, not only the loss that
    # was computed before the update.
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, ema))]
    step_metrics = dict(
      step_metrics,
      loss=loss,
      grad_norm=optax.tree.norm(grads),
      learning_rate=lr_schedule(state["step"]),
      params_finite=jnp.all(jnp.stack(finite)),
    )
    new_state = {
      "step": state["step"] + 1,
      "params": params,
      "opt_state": opt_state,
      "ema_params": ema,
    }
    return new_state, step_metrics

  return train_step


def _non_finite_message(step, checked, interval_loss, manager, start_step, workdir) -> str:
  """Why the run stops (`checked`: the last step found finite), and a way on that cannot lead
  back to the same state."""
  if np.isfinite(interval_loss):
    what = f"the parameters are not finite after step {step}"
  else:
    steps = f"step {step}" if checked + 1 == step else f"steps {checked + 1}..{step}"
    what = f"the loss is {interval_loss} at {steps}"
  message = f"{what}; stopping without saving. "
  saved = sorted(manager.all_steps())
  advice = "lower optim.learning_rate or enable optim.grad_clip_norm"
  if not saved:
    return message + f"No checkpoint was saved: {advice} and re-run."
  message += (
    f"The newest checkpoint, step {saved[-1]} in {workdir}/checkpoints, was finite when saved: "
    f"{advice} and re-run to resume from it"
  )
  if saved[-1] == start_step:  # this run began there: resuming it again may fail the same way
    earlier = [s for s in saved if s < start_step]
    back = f"--config.train.restore_step={earlier[-1]} " if earlier else ""
    message += (
      f"; this run started there, so if it fails again resume from an earlier one with "
      f"{back}(kept: {saved}) or start a new --workdir"
    )
  return message + "."


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state."""
  # ---------------------------------------------------------------- Workdir
  t_start = time.time()  # wall time from here, compilation included
  check_train_config(config.train)
  files.check_writable(workdir)

  # ---------------------------------------------------------------- Mesh
  mesh = parallel.create_mesh(config.mesh)
  parallel.check_batch_divides(config.train.batch_size, mesh, config.train.grad_accum_steps)
  logging.info(
    "Mesh %s over %d devices (%d processes)",
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )

  # ---------------------------------------------------------------- Model & optimizer
  graphdef, init_state, tx, lr_schedule = train_state.build_state(config)
  schedule = diffusion.create_schedule(config.diffusion)
  # A bad sampler config fails now, not after training.
  diffusion.validate(config.sample.sampler, config.sample.steps, config.sample.eta)

  # ---------------------------------------------------------------- Input
  info = data.dataset_info(config.data)
  expected = (config.model.input_size, config.model.input_size, config.model.in_channels)
  if tuple(info.image_shape) != expected:
    raise ValueError(
      f"data {config.data.name!r} gives images of shape {tuple(info.image_shape)} but the model "
      f"expects {expected} (model.input_size, model.in_channels)."
    )
  # Labels past the class table would index out of it (NaN at step 1); unconditional runs
  # (p_uncond = 1) replace every label by the null class.
  if info.num_classes > config.model.num_classes and config.diffusion.p_uncond < 1:
    raise ValueError(
      f"data {config.data.name!r} has {info.num_classes} classes but model.num_classes="
      f"{config.model.num_classes}; set --config.model.num_classes={info.num_classes}."
    )
  rows = parallel.local_rows(mesh, config.train.batch_size)  # the iterator starts after restore

  # ---------------------------------------------------------------- Shard
  abstract_state = jax.eval_shape(init_state)
  state_sharding = parallel.state_shardings(abstract_state, mesh, config.mesh.rules)

  # ---------------------------------------------------------------- Update step
  train_step = make_train_step(config, graphdef, tx, lr_schedule, schedule)
  batch_sharding = parallel.batch_sharding(mesh)
  jit_train_step = jax.jit(
    train_step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )

  # ---------------------------------------------------------------- Checkpoint
  manager = checkpoint.create_manager(
    workdir,
    keep=config.train.keep_checkpoints,
    save_every=config.train.checkpoint_every,
    keep_every=config.train.keep_every,
  )
  restore_step = config.train.restore_step if config.train.restore_step >= 0 else None
  model = nnx.merge(graphdef, abstract_state["params"])  # shapes only: for its methods
  convert = getattr(model, "convert_layout", None)  # checkpoints of the other block layout
  state = checkpoint.restore(
    manager, abstract_state, state_sharding, step=restore_step, convert=convert
  )
  if state is None:
    state = jax.jit(init_state, out_shardings=state_sharding)()
    if config.train.init_from:
      params, changes = checkpoint.transfer_params(
        config.train.init_from,
        abstract_state["params"],
        state_sharding["params"],
        mesh,
        resize=getattr(model, "resize_stored", None),
        convert=convert,
      )
      state = dict(state, params=params, ema_params=jax.tree.map(jnp.copy, params))
      for change in changes:
        logging.info("Stage transition: %s", change)
    logging.info("Initialised a new model in %s", workdir)
  start_step = int(jax.device_get(state["step"]))
  # The workdir accepted this config (same model, or a new run): record it.
  writer = metrics.create_writer(workdir)
  writer.write_hparams(config.to_dict())
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  # Step k reads global batch k (grad_accum_steps splits it, reads no more), and the global stream
  # is the same for any processes and rows: the step alone places the input, no saved iterator.
  train_iter = data.create_train_iterator(
    config.data,
    batch_size=config.train.batch_size,
    seed=config.seed,
    rows=rows,
    start_batch=start_step,
  )
  logging.info(
    "Input starts at global batch %d (the restored step); this process reads rows %s of %d",
    start_step,
    rows,
    config.train.batch_size,
  )

  # ---------------------------------------------------------------- Evals
  # One jitted sampler for the evaluations and the final grid: it compiles once. Time spent here
  # is kept apart (eval_seconds), so that the progress line's rate is the training rate.
  t_eval = time.time()
  sampler = sample.make_sampler(graphdef, schedule, config.sample, config.model.num_classes)
  decode = sample.load_decoder(config)
  evaluator = evaluators.create(config) if config.eval.every else None
  eval_seconds = time.time() - t_eval

  def run_evaluation(step, ema_params):
    t = time.time()
    results, grid = evaluate.sample_and_measure(
      config,
      sampler,
      ema_params,
      evaluator,
      num_images=config.eval.num_samples if evaluator else evaluate.GRID_IMAGES,
      decode=decode,
    )
    seconds = time.time() - t
    train_seconds = t - t_start - eval_seconds
    evaluate.write_results(
      workdir,
      writer,
      step,
      dict(results, seconds=seconds, train_seconds=train_seconds),
      grid,
      baselines=evaluator.baselines if evaluator else {},
      time=t,  # unix time of this evaluation's start
      eval_seconds=eval_seconds,  # spent evaluating before it
    )
    logging.info(
      "Eval at step %d (EMA weights, %d samples, %.0f s): %s",
      step,
      results.get("num_samples", 0),
      seconds,
      evaluator.summary(results) if evaluator else "sample grid only",
    )
    return seconds

  # ---------------------------------------------------------------- Loop
  num_steps = config.train.num_steps
  profile, tracing = profile_range(config.train.profile_steps), False
  stop = _StopSignal()
  last_saved, t_last, step_last = start_step, time.time(), start_step
  checked = start_step  # the last step whose loss and parameters were found finite
  loss_sum = jnp.zeros((), jnp.float32)  # the interval's losses, summed on the device (no sync)
  data_counts = collections.Counter()  # bad / converted files seen (file sources only)
  logging.info("Training from step %d to %d", start_step, num_steps)
  for step in range(start_step + 1, num_steps + 1):
    if profile and step == profile[0]:
      jax.profiler.start_trace(workdir)  # -> <workdir>/plugins/profile/<time>/
      tracing = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      local_batch = next(train_iter)
      data_counts.update(data.pop_counters(local_batch))
      batch = parallel.global_batch(local_batch, mesh)
      with jax.set_mesh(mesh):  # the Pallas scan then runs per batch shard (map_batch_shards)
        state, step_metrics = jit_train_step(state, batch)
      loss_sum = loss_sum + step_metrics["loss"]
    if tracing and step == profile[1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tracing = False
      logging.info("Wrote a trace of steps %d-%d to %s/plugins/profile", *profile, workdir)

    due_log = step % config.train.log_every == 0 or step == num_steps
    stopping = stop_requested(stop, step, config.train.log_every)
    due_save = manager.should_save(step) or stopping
    if due_log or due_save:  # never save a state that is not finite
      step_metrics, interval_loss = jax.device_get((step_metrics, loss_sum))
      if not (np.isfinite(interval_loss) and step_metrics.pop("params_finite")):
        manager.wait_until_finished()
        stop.restore()
        raise FloatingPointError(
          _non_finite_message(step, checked, interval_loss, manager, start_step, workdir)
        )
      checked = step
    if due_log:
      now = time.time()
      steps_per_sec = (step - step_last) / (now - t_last)
      step_metrics.update(data_counts)
      step_metrics.update(
        loss=interval_loss / (step - step_last),  # the interval's mean, not one step's
        steps_per_sec=steps_per_sec,
        images_per_sec=steps_per_sec * config.train.batch_size,
      )
      writer.write_scalars(step, step_metrics)
      logging.info(
        "step %d/%d | loss %.4f | %.2f steps/s | %.0f img/s | ETA %s",
        step,
        num_steps,
        step_metrics["loss"],
        steps_per_sec,
        step_metrics["images_per_sec"],
        _eta((num_steps - step) / max(steps_per_sec, 1e-9)),
      )
      t_last, step_last, loss_sum = now, step, jnp.zeros((), jnp.float32)

    if checkpoint.save(manager, step, state, force=stopping):
      last_saved = step
    if config.train.sample_every and step % config.train.sample_every == 0:
      write_samples(config, workdir, state, sampler, decode, step, writer)
    if config.eval.every and step % config.eval.every == 0 and not stopping:
      seconds = run_evaluation(step, state["ema_params"])
      eval_seconds += seconds
      t_last += seconds  # the next progress line's rate leaves the evaluation out
    if stopping:
      break
  if tracing:  # stopped inside the profiled steps
    jax.profiler.stop_trace()
  stop.restore()

  # ---------------------------------------------------------------- Samples
  final_step = int(jax.device_get(state["step"]))
  if final_step != last_saved:
    checkpoint.save(manager, final_step, state, force=True)
  manager.wait_until_finished()
  logging.info(
    "Trained %d steps in %s (%s of it evaluating)",
    final_step - start_step,
    _eta(time.time() - t_start),
    _eta(eval_seconds),
  )
  if not stop.stopping and config.sample.num_images > 0:
    write_samples(config, workdir, state, sampler, decode, final_step, writer)
  writer.flush()
  return state


def write_samples(config, workdir, state, sampler, decode, step, writer) -> str:
  """Samples a grid with the EMA (or raw) parameters; writes it as PNG and to the metric writer."""
  params = state["ema_params"] if config.sample.use_ema else state["params"]
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
  images = sample.to_uint8(
    sample.generate(
      sampler, params, config=config, num_images=config.sample.num_images, rng=rng, decode=decode
    )
  )
  path = sample.save_grid(os.path.join(workdir, f"samples_{step:07d}.png"), images)
  writer.write_images(step, {"samples": sample.image_grid(images)[None]})
  logging.info("Wrote %s", path)
  return path
