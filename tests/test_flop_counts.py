"""Analytic FLOP counts: the published DiM-H and DiT figures, and every matmul and convolution that
the traced DiM and DiT programs actually execute (counted from their jaxprs)."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dim_jax.models.dim import DiM
from dim_jax.models.dit import DiT
from dim_jax.models.flops import dim_flops, dim_paper_gmacs, dim_sequence_length, dit_flops
from dim_jax.ops import ScanConfig


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _sub_jaxprs(value):
  """Jaxprs held in an equation parameter (closed or open, alone or in a tuple)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  for v in values:
    if hasattr(v, "eqns"):
      yield v
    elif hasattr(getattr(v, "jaxpr", None), "eqns"):
      yield v.jaxpr


def _count_jaxpr_flops(jaxpr, counts=None, repeat=1) -> collections.Counter:
  """2 x multiply-adds of every dot_general and convolution, nested jaxprs and scan loops included.

  Convolutions with feature groups (depth-wise) are counted apart from dense ones, and so are the
  multiplies and adds of Mamba's causal conv1d, which is written as shifted multiply-adds (its ops
  run under the name scope "causal_conv1d").
  """
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      counts["dot"] += repeat * 2 * out * math.prod(lhs[i] for i in lhs_contract)
    elif eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      per_output = math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      kind = "grouped_conv" if eqn.params["feature_group_count"] > 1 else "dense_conv"
      counts[kind] += repeat * 2 * out * per_output
    elif eqn.primitive.name in ("mul", "add") and "causal_conv1d" in str(
      eqn.source_info.name_stack
    ):
      counts["shifted_conv"] += repeat * out
    inner = repeat * eqn.params["length"] if eqn.primitive.name == "scan" else repeat
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        _count_jaxpr_flops(sub, counts, inner)
  return counts


def _traced_flops_per_image(model, image_side: int, in_channels: int, batch: int = 2):
  x = jnp.zeros((batch, image_side, image_side, in_channels))
  jaxpr = jax.make_jaxpr(lambda x, t, y: model(x, t, y))(x, jnp.ones(batch), jnp.zeros(batch, int))
  return {k: v / batch for k, v in _count_jaxpr_flops(jaxpr.jaxpr).items()}


def test_dim_sequence_lengths_match_the_paper():
  # 256², 512², 1024², 1536² images -> latents / 8 -> patch 2 grids (reference notes §1.5).
  lengths = [dim_sequence_length((g, g)) for g in (16, 32, 64, 96)]
  assert lengths == [366, 1230, 4494, 9806]


@pytest.mark.parametrize("grid, published", [((16, 16), 210.0), ((32, 32), 708.0)])
def test_dim_h_paper_convention_gflops(grid, published):
  """DiM-H/2's published GFLOPs (210 at 256², 708 at 512²; reference notes §2)."""
  got = dim_paper_gmacs(width=1536, depth=49, grid=grid)
  assert abs(got - published) / published < 0.005, f"{got:.1f} vs {published}"


@pytest.mark.parametrize(
  "width, depth, published",  # DiT paper Table 4, at 256² (32² latents), fvcore GFLOPs (= GMACs)
  [(384, 12, 6.06), (768, 12, 23.01), (1024, 24, 80.71), (1152, 28, 118.64)],
)
def test_dit_presets_match_published_gflops(width, depth, published):
  count = dit_flops(width=width, depth=depth, grid=(16, 16), patch_size=2, in_channels=4)
  got = count.dense / 2e9
  assert abs(got - published) / published < 0.005, f"DiT D={width}: {got:.2f} vs {published}"


def test_dim_count_equals_the_traced_program():
  """Every dense matmul and conv of a random small DiM, counted from its jaxpr.

  The selective scan is a pass-through passed as its impl, so that what remains are the layers
  counted as `matmul` and `conv` (the scan's own work is the separate `scan` entry).
  """
  rng, seed = _rng()
  arch = dict(
    width=8 * int(rng.integers(2, 9)),
    depth=int(rng.choice([3, 5])),
    patch_size=int(rng.choice([1, 2])),
    in_channels=int(rng.integers(1, 5)),
    d_state=int(rng.integers(1, 9)),
  )
  grid = int(rng.integers(2, 6))
  pass_through = ScanConfig(impl=lambda u, *args, **kwargs: u)
  model = DiM(
    input_size=grid * arch["patch_size"], num_classes=3, scan=pass_through, rngs=nnx.Rngs(0),
    **arch,
  )  # fmt: skip
  traced = _traced_flops_per_image(model, grid * arch["patch_size"], arch["in_channels"])
  count = dim_flops(grid=(grid, grid), **arch)
  msg = f"seed {seed}, {arch}, grid {grid}"
  assert traced["dot"] + traced.get("dense_conv", 0) == count.matmul, msg
  assert traced["grouped_conv"] + traced["shifted_conv"] == count.conv, msg


def test_dit_count_equals_the_traced_program():
  rng, seed = _rng()
  heads = int(rng.integers(1, 4))
  arch = dict(
    width=4 * heads * int(rng.integers(1, 4)),
    depth=int(rng.integers(1, 4)),
    patch_size=int(rng.choice([1, 2])),
    in_channels=int(rng.integers(1, 5)),
  )
  grid = int(rng.integers(1, 6))
  model = DiT(num_heads=heads, num_classes=3, attention_impl="xla", rngs=nnx.Rngs(0), **arch)
  traced = _traced_flops_per_image(model, grid * arch["patch_size"], arch["in_channels"])
  count = dit_flops(grid=(grid, grid), **arch)
  assert traced["dot"] + traced["dense_conv"] == count.dense, f"seed {seed}, {arch}, grid {grid}"
