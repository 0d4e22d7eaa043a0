"""Where a DiM step's time goes: the scan, the matmuls, the token permutations and the rest, each
set against its own floor. Shared by `throughput.py --breakdown` (the sampling forward) and
`train_step.py --breakdown` (the training step).

Measured, each in the same run:
  full          the step as the model runs it
  -scan         the selective scan replaced by a stand-in that reads what the scan reads and does
                O(L·D) work (XLA cannot drop what feeds it)
  -scan -perm   also one scan direction for every block: no token permutations
  matmuls       the model's matmuls alone, at their shapes and count, on random bf16 data (training:
                forward and backward, and the forward again where `model.remat` recomputes it)
Split: scan = full - (-scan); permutations = (-scan) - (-scan -perm); matmuls as measured; the
rest = (-scan -perm) - matmuls (norms, convs, gates, embeddings; training: also the loss, AdamW
and EMA). Floors: scan, benchmarks/scan.py's (the larger of its exponentials and its bytes at the
measured copy bandwidth) per block; matmuls, their FLOPs at the measured bf16 matmul rate;
permutations, the token stream (B, L, D float32) read and written once per change of direction
(training: twice, the backward permutes its gradient) at the copy bandwidth. The rest has none.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import scan as scan_bench
from dim_jax.models import layout
from dim_jax.models.dim_blocks import NUM_PREFIX

ABLATIONS = ("", " -scan", " -scan -perm")


def scan_stand_in(u, delta, A, B, C, D, *, z=None, **_):
  """Reads everything the selective scan reads and does O(L·D) elementwise work: timing the model
  with it instead of the scan measures everything but the recurrence."""
  f32 = jnp.float32
  mix = (B.astype(f32).sum(-1) * C.astype(f32).sum(-1))[..., None]  # (B, L, 1)
  y = u.astype(f32) * D + delta.astype(f32) * mix + A.sum()
  return (y * jax.nn.silu(z.astype(f32))).astype(u.dtype)


def ablated(model_config, ablation: str) -> ml_collections.ConfigDict:
  """An unlocked copy of a DiM `model` config without its scan ("-scan") and also without token
  permutations ("-perm": one scan direction); the parameters are the same."""
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  if "-scan" in ablation:
    cfg.scan = dict(cfg.scan.to_dict(), impl=scan_stand_in)
  if "-perm" in ablation:
    cfg.scan_directions = 1
  return cfg


def matmul_shapes(arch: dict, model_config, length: int, tokens: int) -> dict[str, tuple]:
  """{name: (rows per image, k, n, count)} of DiM's matmuls for sequences of `length` tokens of
  which `tokens` are image patches; arch = width, depth, patch_size."""
  d, depth = arch["width"], arch["depth"]
  inner, rank, n = model_config.expand * d, math.ceil(d / 16), model_config.d_state
  decoder = (depth - 1) // 2
  patch_dim = arch["patch_size"] ** 2 * model_config.in_channels
  shapes = {
    "in_proj": (length, d, 2 * inner, depth),
    "x_proj": (length, inner, rank + 2 * n, depth),
    "dt_proj": (length, rank, inner, depth),
    "out_proj": (length, inner, d, depth),
    "patch_embed": (tokens, patch_dim, d, 1),
    "final_proj": (tokens, d, patch_dim, 1),
  }
  if d <= 512:  # SkipFusion: one linear of the concatenation, else two
    shapes["skip_fusion"] = (length, 2 * d, d, decoder)
  else:
    shapes["skip_fusion"] = (length, d, d, 2 * decoder)
  return shapes


# model.remat -> the matmuls the backward recomputes (those whose outputs it does not keep).
RECOMPUTED = {
  "none": (),
  "save_dots": (),
  "save_scan": ("x_proj", "dt_proj"),
  "block": ("in_proj", "x_proj", "dt_proj", "out_proj"),
}


def _matmul(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def matmul_seconds(shapes: dict, batch: int, *, train: bool, remat: str = "none") -> float:
  """Seconds of the matmuls alone: each shape timed on random bf16 data (float32 accumulation,
  bf16 out, as nnx.Linear in bf16), times its count; training adds the two backward matmuls and
  the recomputed forward."""
  total = 0.0
  for name, (rows, k, n, count) in shapes.items():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch * rows, k), jnp.bfloat16)
    w = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    seconds = scan_bench.timed(jax.jit(_matmul), x, w)
    if train:  # dx = g wᵀ and dw = xᵀ g; the forward again where the backward recomputes it
      g = jax.random.normal(keys[2], (batch * rows, n), jnp.bfloat16)
      backward = jax.jit(lambda x, w, g: jax.vjp(_matmul, x, w)[1](g))
      seconds *= 2 if name in RECOMPUTED[remat] else 1
      seconds += scan_bench.timed(backward, x, w, g)
    total += count * seconds
  return total


def matmul_flops(shapes: dict, batch: int, *, train: bool) -> float:
  """FLOPs of the matmuls (training: forward and backward, no recomputation)."""
  forward = sum(2 * batch * rows * k * n * count for rows, k, n, count in shapes.values())
  return 3 * forward if train else forward


def direction_changes(depth: int, directions: int) -> int:
  """Token permutations in a forward pass: one per block whose direction differs from the last
  (the stream starts and ends in raster order)."""
  schedule = [layout.RASTER, *layout.scan_schedule(depth, directions)]
  return sum(a != b for a, b in zip(schedule[:-1], schedule[1:], strict=True))


def floors(arch: dict, model_config, batch: int, grid: int, rates: dict, *, train: bool) -> dict:
  """Seconds of each part's floor (module docstring); rates: matmul FLOP/s, copy bytes/s."""
  h = w = grid
  length = NUM_PREFIX + math.prod(layout.padded_grid(h, w))
  inner = model_config.expand * arch["width"]
  fwd, fwd_bwd = scan_bench.bounds(length, inner, model_config.d_state, batch, rates["copy"])
  moved = 2 * batch * (length - NUM_PREFIX) * arch["width"] * 4  # read and write, float32
  perms = direction_changes(arch["depth"], model_config.scan_directions)
  shapes = matmul_shapes(arch, model_config, length, h * w)
  return {
    "scan": arch["depth"] * (fwd_bwd if train else fwd),
    "matmuls": matmul_flops(shapes, batch, train=train) / rates["matmul"],
    "permutations": (2 if train else 1) * perms * moved / rates["copy"],
  }


def split(times: dict, matmuls: float) -> dict:
  """times: {"": full, " -scan": ..., " -scan -perm": ...} seconds -> seconds of each part."""
  return {
    "scan": times[""] - times[" -scan"],
    "matmuls": matmuls,
    "permutations": times[" -scan"] - times[" -scan -perm"],
    "rest": times[" -scan -perm"] - matmuls,
  }


def split_table(rows: list[dict], unit: str) -> str:
  """rows: {"label", "parts": {part: s}, "floors": {part: s}, "total": s} -> markdown, in `unit`
  ("ms/img" or "ms/step")."""
  lines = [
    f"| what | part | {unit} | share | floor {unit} | measured / floor |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for row in rows:
    for part, seconds in row["parts"].items():
      floor = row["floors"].get(part)
      ratio = f"{seconds / floor:.2f}" if floor else "–"
      floor_ms = f"{floor * 1e3:.4g}" if floor else "–"
      lines.append(
        f"| {row['label']} | {part} | {seconds * 1e3:.4g} | {seconds / row['total']:.0%} "
        f"| {floor_ms} | {ratio} |"
      )
  return "\n".join(lines) + "\n"
