"""The DiT baseline: published parameter counts, attention and block maths against float64 NumPy,
the adaLN-Zero start (a fresh model predicts exactly 0), any grid size, clear config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dim_jax.configs import common
from dim_jax.models.dit import DiT, DiTBlock, SelfAttention, build_dit, sincos_position_embedding


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _dit_config(**fields):
  """The `model` section with DiT's fields set (an unlocked copy, so new fields may be added)."""
  cfg = ml_collections.ConfigDict(common.base_config().model.to_dict())
  cfg.update({"name": "dit", "num_heads": 6, "attention_impl": "xla", **fields})
  return cfg


def _randomise(module: nnx.Module, rng: np.random.Generator, scale: float = 0.3) -> None:
  """Overwrites every parameter (zero-initialised ones included) with N(0, scale²) draws."""
  for _, param in nnx.iter_graph(module):
    if isinstance(param, nnx.Param):
      param[...] = jnp.asarray(scale * rng.normal(size=param.shape), jnp.float32)


# --- float64 NumPy references (DiT paper §3.2; timm's Attention; MAE's 2-D sin-cos) ------------


def _attention_by_hand(x, wqkv, bqkv, wproj, bproj, num_heads):
  """softmax(q kᵀ/√d) v per head, qkv columns laid out (heads, [q, k, v], d_head)."""
  batch, length, dim = x.shape
  head_dim = dim // num_heads
  qkv = (x @ wqkv + bqkv).reshape(batch, length, num_heads, 3, head_dim)
  out = np.zeros((batch, length, num_heads, head_dim))
  for b in range(batch):
    for h in range(num_heads):
      q, k, v = qkv[b, :, h, 0], qkv[b, :, h, 1], qkv[b, :, h, 2]
      logits = q @ k.T / math.sqrt(head_dim)
      weights = np.exp(logits - logits.max(axis=1, keepdims=True))
      out[b, :, h] = (weights / weights.sum(axis=1, keepdims=True)) @ v
  return out.reshape(batch, length, dim) @ wproj + bproj


def _layer_norm_by_hand(x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _f64(v):
  return np.asarray(v[...], np.float64)


def _block_by_hand(block: DiTBlock, x, c, num_heads):
  silu_c = c / (1 + np.exp(-c))
  mods = silu_c @ _f64(block.modulation.kernel) + _f64(block.modulation.bias)
  shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = np.split(mods[:, None], 6, axis=-1)
  attn = block.attn
  h = _layer_norm_by_hand(x) * (1 + scale_a) + shift_a
  h = _attention_by_hand(
    h, _f64(attn.qkv.kernel), _f64(attn.qkv.bias), _f64(attn.proj.kernel), _f64(attn.proj.bias),
    num_heads,
  )  # fmt: skip
  x = x + gate_a * h
  h = _layer_norm_by_hand(x) * (1 + scale_m) + shift_m
  h = _gelu_tanh(h @ _f64(block.fc1.kernel) + _f64(block.fc1.bias))
  return x + gate_m * (h @ _f64(block.fc2.kernel) + _f64(block.fc2.bias))


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "variant, expected",  # DiT paper Table 4, ImageNet 256² latents (4 x 32 x 32), 1000 classes
  [("S/2", 33e6), ("B/2", 130e6), ("L/2", 458e6), ("XL/2", 675e6)],
)
def test_preset_parameter_counts(variant, expected):
  cfg = _dit_config(variant=variant, in_channels=4, input_size=32, num_classes=1000)
  model = nnx.eval_shape(lambda: build_dit(cfg, nnx.Rngs(0)))  # no allocation
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(count - expected) / expected < 0.01, f"DiT-{variant}: {count / 1e6:.2f} M"


def test_attention_matches_float64_softmax_reference():
  rng, seed = _rng()
  num_heads, head_dim = int(rng.integers(2, 5)), int(rng.integers(2, 9))
  dim, batch, length = num_heads * head_dim, 2, int(rng.integers(3, 20))
  attn = SelfAttention(dim, num_heads, attention_impl="xla", dtype=jnp.float32, rngs=nnx.Rngs(0))
  _randomise(attn, rng)
  x = rng.normal(size=(batch, length, dim))
  got = np.asarray(attn(jnp.asarray(x, jnp.float32)), np.float64)
  want = _attention_by_hand(
    x, _f64(attn.qkv.kernel), _f64(attn.qkv.bias), _f64(attn.proj.kernel), _f64(attn.proj.bias),
    num_heads,
  )  # fmt: skip
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")


def test_adaln_zero_block_matches_float64_reference():
  rng, seed = _rng()
  num_heads, head_dim = int(rng.integers(2, 5)), 4
  dim, batch, length = num_heads * head_dim, 2, int(rng.integers(3, 12))
  block = DiTBlock(dim, num_heads, attention_impl="xla", dtype=jnp.float32, rngs=nnx.Rngs(0))
  _randomise(block, rng)  # non-zero modulation, so shift / scale / gate all act
  x, c = rng.normal(size=(batch, length, dim)), rng.normal(size=(batch, dim))
  got = np.asarray(block(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)), np.float64)
  want = _block_by_hand(block, x, c, num_heads)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")


def test_fresh_blocks_are_identity_and_fresh_model_predicts_zero():
  rng, seed = _rng()
  model = DiT(
    in_channels=3, width=16, depth=2, num_heads=2, num_classes=5, rngs=nnx.Rngs(int(seed % 2**31))
  )
  x, c = rng.normal(size=(2, 9, 16)).astype(np.float32), rng.normal(size=(2, 16)).astype(np.float32)
  for block in model.blocks:  # adaLN-Zero: every gate starts at 0
    np.testing.assert_array_equal(np.asarray(block(x, c)), x, err_msg=f"seed {seed}")
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  out = model(images, jnp.asarray(rng.uniform(0, 1000, 2)), jnp.asarray([0, 5]))
  np.testing.assert_array_equal(np.asarray(out), 0.0, err_msg=f"seed {seed}")


def test_position_embedding_matches_float64_reference():
  rng, seed = _rng()
  h, w, dim = int(rng.integers(1, 9)), int(rng.integers(1, 9)), 4 * int(rng.integers(1, 9))
  quarter = dim // 4
  want = np.zeros((h * w, dim))
  for i in range(h):
    for j in range(w):
      for k in range(quarter):
        omega = 10_000.0 ** (-k / quarter)
        want[i * w + j, [k, quarter + k]] = np.sin(j * omega), np.cos(j * omega)  # column
        want[i * w + j, [2 * quarter + k, 3 * quarter + k]] = np.sin(i * omega), np.cos(i * omega)
  got = np.asarray(sincos_position_embedding(h, w, dim), np.float64)
  np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"seed {seed}, grid {h}x{w}, D={dim}")


def test_any_grid_size_gives_an_image_of_that_size():
  rng, seed = _rng()
  cfg = _dit_config(variant=None, width=16, depth=1, num_heads=2, in_channels=3, num_classes=4)
  model = build_dit(cfg, nnx.Rngs(0))
  _randomise(model, rng, scale=0.1)  # a trained-looking model, not the all-zero start
  for h, w in [(1, 1), (2, 5), (int(rng.integers(1, 7)), int(rng.integers(1, 7)))]:
    x = rng.normal(size=(2, 2 * h, 2 * w, 3)).astype(np.float32)
    out = np.asarray(model(x, jnp.asarray([3.0, 700.0]), jnp.asarray([1, 4])))
    assert out.shape == x.shape, f"grid {h}x{w}: {out.shape}"
    assert np.isfinite(out).all() and np.abs(out).max() > 0, f"grid {h}x{w}, seed {seed}"


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(variant="M/2"), "model.variant='M/2'"),
    (dict(variant=None, width=30, num_heads=4), "model.num_heads=4"),
    (dict(variant=None, width=18, num_heads=3), "multiple of 4"),
    (dict(variant="S/2", attention_impl="flash"), "model.attention_impl='flash'"),
  ],
)
def test_bad_config_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    nnx.eval_shape(lambda: build_dit(_dit_config(**fields), nnx.Rngs(0)))
