"""`ScanConfig`: how `selective_scan` runs, typed; built from the `model.scan` config block."""

import dataclasses
from collections.abc import Callable

# jax.ad_checkpoint names of what a remat policy may keep (models/layers.py REMAT_POLICIES): the
# scan's output, and the fused kernels' states kept for their backward.
SCAN_OUTPUT = "scan_output"
SCAN_STATES = "scan_states"


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """The implementation and the settings of the fused kernel that trade speed for memory.

  configs/common.py (`model.scan`) documents each field; 0 means "the implementation's own"."""

  impl: str | Callable = "auto"  # or a stand-in with selective_scan's signature (benchmarks)
  chunk: int = 0  # time steps per chunk: chunked 256, pallas_gpu 4
  save_every: int = 1  # pallas_gpu: chunks per state kept for the backward
  fwd_chunk: int = 0  # pallas_gpu: the forward's own chunk (a divisor of chunk x save_every)
  segments: int = 0  # pallas_gpu: programs the sequence is split over

  def __post_init__(self):
    for name in ("chunk", "fwd_chunk", "segments"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"model.scan.{name}={value!r}: use an integer >= 0 (0: the default).")
    if not isinstance(self.save_every, int) or self.save_every < 1:
      raise ValueError(f"model.scan.save_every={self.save_every!r}: use an integer >= 1.")
