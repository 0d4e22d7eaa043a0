"""Mamba-1's selective scan (S6), with one switch for how the recurrence runs.

Semantics (Mamba, arXiv 2312.00752, Alg. 2), per sample, channel d and state n:

  Δ_t     = softplus(δ_t + bias)                       (or δ_t + bias without softplus)
  h_t     = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t        ZOH for A, Euler for B; h_0 = 0
  y_t     = C_t · h_t + D u_t
  out_t   = y_t ⊙ SiLU(z_t)                             (when a gate z is given)

Δ, exp(ΔA), the state and y are float32 whatever the input dtype (a bf16 exp(ΔA) rounds decays
like 0.999 to 1 and the state stops forgetting); the output has u's dtype.

Implementations (`ScanConfig.impl`):
  reference    sequential `lax.scan` over time: the oracle (`xla.py`)
  associative  `lax.associative_scan` over (B, L, D, N) pairs: parallel, but materialises them
  chunked      `lax.scan` over chunks carrying h, associative scan inside each rematerialised chunk
  pallas_gpu   the fused kernel (`gpu.py`): state in registers, one GPU lane per channel, custom
               VJP recomputing per chunk; runs anywhere through the Pallas interpreter, slowly
  pallas_tpu   the fused Mosaic kernel (`tpu.py`): channels on the 128 lanes, states on the
               sublanes, time chunks through VMEM, custom VJP recomputing per chunk; the Pallas
               interpreter off TPU
  auto         per platform, the fastest that is correct there (`AUTO`); docs/scan.md has the
               measurements behind the choice
"""

import jax

from dim_jax import parallel
from dim_jax.ops.scan import gpu, tpu, xla
from dim_jax.ops.scan.config import ScanConfig

# (u, Δ float32, A, B, C, config) -> C·h float32; the skip and the gate are added here.
XLA_IMPLS = {"reference": xla.reference, "associative": xla.associative, "chunked": xla.chunked}
# Fused kernels take δ, the skip and the gate themselves: selective_scan's arguments in order.
KERNELS = {"pallas_gpu": gpu.selective_scan, "pallas_tpu": tpu.selective_scan}
IMPLS = (*XLA_IMPLS, *KERNELS, "auto")
# CPU: the sequential scan compiles and runs fastest there. TPU: the Mosaic kernel (checked here
# against the float64 loop in the interpreter and compiled for v4, v5p and v6e; not yet timed on a
# TPU, docs/scan.md has its expected times). Other platforms: chunked.
AUTO = {"cpu": "reference", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}

__all__ = ["IMPLS", "ScanConfig", "resolve_impl", "selective_scan"]


def resolve_impl(impl):
  """The implementation `impl` names on this platform ("auto" resolved); fails on unknown names.
  A function passed as impl is kept: a stand-in, as the benchmarks time DiM without its scan."""
  if callable(impl):
    return impl
  if impl not in IMPLS:
    raise ValueError(f"model.scan.impl={impl!r} is unknown; use one of {', '.join(IMPLS)}.")
  return AUTO.get(jax.default_backend(), "chunked") if impl == "auto" else impl


def selective_scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array,
  *,
  delta_bias: jax.Array | None = None,
  delta_softplus: bool = True,
  z: jax.Array | None = None,
  config: ScanConfig = ScanConfig(),
) -> jax.Array:
  """Mamba-1 selective scan; see the module docstring for the equations.

  Args:
    u: input, (batch, length, channels).
    delta: pre-activation step size δ, (batch, length, channels).
    A: state matrix (negative for a stable scan), (channels, state).
    B, C: input and output projections, (batch, length, state).
    D: skip weight, (channels,).
    delta_bias: added to δ before the softplus, (channels,).
    delta_softplus: apply softplus to δ + bias.
    z: gate, (batch, length, channels); the output is multiplied by SiLU(z).
    config: the implementation and its settings.

  Returns:
    (batch, length, channels) in u's dtype.
  """
  impl = resolve_impl(config.impl)
  if callable(impl):
    return impl(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus, z=z)
  if impl in KERNELS:
    kernel = KERNELS[impl]

    def fused(u, delta, B, C, z, A, D, delta_bias):
      return kernel(u, delta, A, B, C, D, delta_bias, delta_softplus, z, config)

    # A Pallas call is opaque to the partitioner: under a mesh each device runs it on its own rows.
    return parallel.map_batch_shards(fused, (u, delta, B, C, z), (A, D, delta_bias))
  dt = xla.discretised_delta(delta, delta_bias, delta_softplus)  # (B, L, D) float32
  y = XLA_IMPLS[impl](u, dt, A, B, C, config)  # (B, L, D) float32
  return xla.gated_output(y, u, D, z, u.dtype)
