"""The Mamba-1 mixer (Gu & Dao, arXiv 2312.00752) as DiM uses it: unidirectional, d_conv = 3.

x (B, L, D) -> in_proj -> [x_in, z], (B, L, E) each with E = expand * D
x_in -> causal depth-wise conv1d (kernel 3) -> SiLU -> x_proj -> (dt_low, B, C)
dt = dt_proj(dt_low) (bias applied inside the scan), y = selective_scan(x_in, dt, A, B, C, D, z)
out = out_proj(y) (B, L, D)

Initialisation as `mamba_ssm/modules/mamba_simple.py` plus DiM's model-level pass
(`init_weights.py`): dt bias = softplus⁻¹ of a log-uniform draw in [dt_min, dt_max] (never
overwritten by a generic init), A = -exp(A_log) with A_log = log(1..N), D = 1, out_proj rescaled by
1/√num_layers.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dim_jax import parallel
from dim_jax.models.layers import (
  IN_PROJ_OUTPUT,
  MIXER_OUTPUT,
  linear,
  torch_default_bias_init,
  torch_default_init,
  uniform_init,
)
from dim_jax.ops.scan import ScanConfig, selective_scan
from dim_jax.ops.scan.config import SCAN_OUTPUT


def _dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
  """Inverse softplus of dt ~ exp(U[log dt_min, log dt_max]), dt clamped to >= dt_floor."""

  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus⁻¹(dt)

  return init


def _scaled(init, scale: float):
  def scaled_init(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) * scale

  return scaled_init


class CausalDepthwiseConv1d(nnx.Module):
  """y_t = b + Σ_k w_k ⊙ x_{t-(K-1)+k} per channel (zeros before the start): token t sees only
  t-K+1..t. Parameters as nnx.Conv(feature_group_count=channels) keeps them, kernel (K, 1, E) and
  bias (E,), so checkpoints and converted weights are the same. Written as K shifted
  multiply-adds rather than a grouped convolution: XLA fuses them with the SiLU that follows into
  one pass over (B, L, E), where a grouped convolution is a separate, slower library call."""

  def __init__(self, channels: int, kernel_size: int, *, dtype, rngs: nnx.Rngs):
    self.kernel_size, self.dtype = kernel_size, dtype
    self.kernel = nnx.Param(
      torch_default_init(rngs.params(), (kernel_size, 1, channels)),
      out_sharding=(None, None, "mlp"),
    )
    self.bias = nnx.Param(
      torch_default_bias_init(kernel_size)(rngs.params(), (channels,)), out_sharding=("mlp",)
    )

  @jax.named_scope("causal_conv1d")  # names its ops in profiles (and for the FLOP-count test)
  def __call__(self, x: jax.Array) -> jax.Array:
    f32, length = jnp.float32, x.shape[1]
    # Inputs and weights rounded to the compute dtype as a convolution in it would be, the sum in
    # float32 as its accumulator.
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (self.kernel_size - 1, 0), (0, 0)))
    w = self.kernel[...][:, 0].astype(self.dtype).astype(f32)  # (K, E)
    y = self.bias[...].astype(self.dtype).astype(f32)
    for k in range(self.kernel_size):
      y = y + padded[:, k : k + length].astype(f32) * w[k]  # (B, L, E)
    return y.astype(self.dtype)


class MambaMixer(nnx.Module):
  """Mamba-1 selective-SSM mixer on (B, L, D) sequences."""

  def __init__(
    self,
    dim: int,
    *,
    num_layers: int,
    d_state: int = 16,
    d_conv: int = 3,
    expand: int = 2,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dt_floor: float = 1e-4,
    scan: ScanConfig = ScanConfig(),
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    inner = expand * dim
    self.inner, self.d_state, self.d_conv = inner, d_state, d_conv
    self.dt_rank = math.ceil(dim / 16)
    self.scan = scan
    self.dtype = dtype
    self.in_proj = linear(
      dim, 2 * inner, axes=("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs
    )
    self.conv1d = CausalDepthwiseConv1d(inner, d_conv, dtype=dtype, rngs=rngs)
    self.x_proj = linear(
      inner, self.dt_rank + 2 * d_state, axes=("mlp", None), use_bias=False, dtype=dtype, rngs=rngs
    )
    dt_std = self.dt_rank**-0.5
    self.dt_proj = nnx.Linear(
      self.dt_rank,
      inner,
      kernel_init=nnx.with_partitioning(uniform_init(dt_std), (None, "mlp")),
      bias_init=nnx.with_partitioning(_dt_bias_init(dt_min, dt_max, dt_floor), ("mlp",)),
      dtype=dtype,
      rngs=rngs,
    )
    # S4D-real: A[d, n] = -(n + 1), stored as its log; kept float32.
    a_log = jnp.log(
      jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (inner, d_state))
    )
    self.A_log = nnx.Param(a_log, out_sharding=("mlp", None))
    self.D = nnx.Param(jnp.ones((inner,), jnp.float32), out_sharding=("mlp",))
    self.out_proj = linear(
      inner,
      dim,
      axes=("mlp", "embed"),
      use_bias=False,
      kernel_init=_scaled(torch_default_init, 1.0 / math.sqrt(num_layers)),
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    xz = checkpoint_name(parallel.shard_batch(self.in_proj(x)), IN_PROJ_OUTPUT)  # (B, L, 2E)
    x_in, z = jnp.split(xz, 2, axis=-1)  # (B, L, E) each
    x_in = nnx.silu(self.conv1d(x_in))
    x_dbl = self.x_proj(x_in)  # (B, L, R + 2N)
    dt_low, b, c = jnp.split(x_dbl, [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
    dt = dt_low @ self.dt_proj.kernel[...].astype(dt_low.dtype)  # (B, L, E); bias goes to the scan
    y = selective_scan(
      x_in,
      dt,
      -jnp.exp(self.A_log[...]),
      b,
      c,
      self.D[...],
      delta_bias=self.dt_proj.bias[...],
      delta_softplus=True,
      z=z,
      config=self.scan,
    )  # (B, L, E), x_in's dtype
    return checkpoint_name(self.out_proj(checkpoint_name(y, SCAN_OUTPUT)), MIXER_OUTPUT)
