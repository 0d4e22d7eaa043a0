"""Metric writers: clu's where TensorFlow is installed, an equivalent tensorboardX writer elsewhere.

`clu.metric_writers` imports TensorFlow and TensorBoard at import time; the GPU image has neither,
so there the same calls (`write_scalars`, `write_images`, `write_hparams`, `flush`, `close`) go to
tensorboardX, which writes the same TensorBoard event files. Only process 0 writes files; the
others only log.
"""

import re

import jax
import numpy as np
from absl import logging


class TensorboardXWriter:
  """The subset of clu's MetricWriter interface that dim_jax uses, on tensorboardX."""

  def __init__(self, logdir: str, *, just_logging: bool = False):
    self._writer = None
    if not just_logging:
      import tensorboardX

      self._writer = tensorboardX.SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._writer:
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(value), step)

  def write_images(self, step: int, images: dict) -> None:
    if self._writer:
      for key, value in images.items():
        self._writer.add_image(key, np.asarray(value), step, dataformats="HWC")

  def write_hparams(self, hparams: dict) -> None:
    if self._writer:
      flat = {
        k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
      }
      self._writer.add_hparams(flat, {}, name=".")  # "." keeps them in this run's folder

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def create_writer(workdir: str):
  """clu's default writer (logging + TensorBoard files), or the tensorboardX equivalent."""
  just_logging = jax.process_index() > 0
  try:
    from clu import metric_writers
  except ImportError:
    logging.info(
      "clu.metric_writers needs TensorFlow; writing TensorBoard files with tensorboardX."
    )
    return TensorboardXWriter(workdir, just_logging=just_logging)
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)


def logged_scalar(log: str, key: str, line_prefix: str = "") -> dict[int, float]:
  """{step: value} of scalar `key` from a run's log: the "[step] key=value, ..." lines that both
  writers log (for comparing runs, e.g. one process against several)."""
  pattern = rf"^{re.escape(line_prefix)}.*\[(\d+)\] .*\b{re.escape(key)}=([-+0-9.e]+|nan|inf)"
  return {int(step): float(value) for step, value in re.findall(pattern, log, re.M)}


def flatten_config(config) -> dict:
  """{"optim.learning_rate": 2e-4, ...} for write_hparams."""
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        visit(name + ".", value)
      else:
        flat[name] = value

  visit("", config)
  return flat
