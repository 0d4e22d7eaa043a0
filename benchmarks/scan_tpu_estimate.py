"""Expected time of the pallas_tpu scan on one TPU chip, from the chip's issue rates.

The kernel is bound by the vector unit, not by HBM (docs/scan.md, "The scan on TPU"). Per time
step and per (8 sublane x 128 lane) register of (state, channel) pairs, at block_d 256 (a (16, 256)
state is 4 registers):

  forward   4 float32 multiplies (Δ·A log2 e, decay·h, B·Δu, C·h) on the one multiply slot, about
            as many adds, selects and sublane sums of C·h on the other, 1 exp2 on the EUP (one
            register every 2 cycles), and 1 of the 4 lane sums that pick B_t, C_t out of their
            (N, chunk) tiles (XLU: 8 cycles each, 2 queues): FORWARD_CYCLES;
  backward  the forward again (the chunk's states are rebuilt) plus 9 multiplies, two sublane sums
            and, on the XLU, 2 lane sums (picking B_t, C_t; dB_t, dC_t): BACKWARD_CYCLES.

Unit rates as measured on a TPU v4 TensorCore (one f32 multiply and one f32 add issued per cycle,
vpow2 every 2 cycles, a cross-lane permute or sum every 8 cycles per XLU queue), assumed unchanged
on v5e and v5p, whose vector units Google does not describe; clocks follow from the published bf16
peaks (4 MXUs of 128 x 128 per TensorCore, 2 flops per MAC). HBM traffic (u, δ, z in, y out; the
backward also reads g and writes du, dδ, dz) is checked against the published bandwidth and the
larger time wins.
"""

import dataclasses

FORWARD_CYCLES = 5
BACKWARD_CYCLES = 15


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float  # published peak per chip
  tensor_cores: int  # per chip (megacore: the kernel's parallel grid axes are split over them)
  hbm_bytes_s: float  # published HBM bandwidth per chip

  @property
  def clock_hz(self) -> float:
    return self.bf16_flops / (self.tensor_cores * 4 * 128 * 128 * 2)


CHIPS = {  # jax device_kind -> published figures (Cloud TPU system architecture pages)
  "TPU v4": Chip("v4", 275e12, 2, 1.2e12),
  "TPU v5 lite": Chip("v5e", 197e12, 1, 819e9),
  "TPU v5": Chip("v5p", 459e12, 2, 2.765e12),
}


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def _registers(length, channels, state, batch, chunk=128, block_d=256):
  """Register-steps the kernel walks: (8, 128) tiles of (state, channel) pairs times time steps,
  with the length padded to whole chunks and the channels to whole blocks, as the kernel pads."""
  steps = _round_up(length, min(chunk, _round_up(length, 8)))
  return batch * steps * _round_up(channels, block_d) * _round_up(state, 8) // 1024


def expected_seconds(chip: Chip, length, channels, state, batch, itemsize=2):
  """(forward, forward + backward) seconds on one chip; itemsize of u, δ, z, y, g."""
  regs = _registers(length, channels, state, batch)
  rate = chip.tensor_cores * chip.clock_hz
  rows = batch * length * channels * itemsize
  fwd = max(FORWARD_CYCLES * regs / rate, 4 * rows / chip.hbm_bytes_s)
  bwd = max(BACKWARD_CYCLES * regs / rate, 7 * rows / chip.hbm_bytes_s)
  return fwd, fwd + bwd
