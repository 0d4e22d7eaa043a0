"""Metric writers: clu's where TensorFlow is installed, an equivalent tensorboardX writer elsewhere.

`clu.metric_writers` imports TensorFlow and TensorBoard at import time; the GPU image has neither,
so there the same calls (`write_scalars`, `write_images`, `write_hparams`, `flush`, `close`), with
the same arguments, go to tensorboardX, which writes the same TensorBoard event files. Only process
0 writes files; the others only log.
"""

import re
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from flax import traverse_util


class TensorboardXWriter:
  """The subset of clu's MetricWriter interface that dim_jax uses, on tensorboardX."""

  def __init__(self, logdir: str, *, just_logging: bool = False):
    self._writer = None
    if not just_logging:
      import tensorboardX

      self._writer = tensorboardX.SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._writer:
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(value), step)

  def write_images(self, step: int, images: Mapping) -> None:
    """Images of shape (N, H, W, C) or (H, W, C), C = 1 or 3, as clu takes them."""
    if self._writer:
      for key, value in images.items():
        value = np.asarray(value)
        if value.ndim == 3:
          value = value[None]
        if value.ndim != 4:
          raise ValueError(f"image {key!r} has shape {value.shape}; expected (N, H, W, C).")
        self._writer.add_images(key, value, step, dataformats="NHWC")

  def write_hparams(self, hparams: Mapping) -> None:
    """A nested mapping (or ConfigDict) of hyper-parameters, flattened to "optim.learning_rate"."""
    logging.info("Hyper-parameters: %s", hparams)
    if self._writer:
      nested = hparams.to_dict() if hasattr(hparams, "to_dict") else dict(hparams)
      flat = {
        k: "" if v is None else v if isinstance(v, int | float | str | bool) else str(v)
        for k, v in traverse_util.flatten_dict(nested, sep=".").items()
      }
      # Into this run's own event file, as clu does (add_hparams would open another writer).
      from tensorboardX.summary import hparams as hparams_summaries

      for summary in hparams_summaries(flat, {}):
        self._writer.file_writer.add_summary(summary)

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
