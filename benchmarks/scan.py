"""Selective-scan benchmark: `selective_scan` as DiM's mixer calls it, at DiM-H/2's resolutions.

Inputs as the mixer passes them: u, δ, z, B, C in bf16, A, D and the δ bias in float32, softplus
on. The implementation and its settings are the `model.scan` block of configs/common.py (default:
impl "auto"), overridden as any config field is: `--scan.impl=chunked --scan.save_every=4`.

Per shape (L, D, N, batch) of DiM-H/2 (pads and prefix included), forward and forward+backward:
  ms     median time of calls issued back to back
  bound  the larger of two floors: the exponentials, one per (t, d, n) at 132 SMs x 16 SFU lanes
         x 1.98 GHz (an H200; forward+backward counts them twice, the backward recomputes them),
         and the bytes, each input read and each output written once at the copy bandwidth
         measured in the same run
  ratio  ms / bound
  kept   bytes the VJP keeps for the backward beyond the inputs
The official Mamba CUDA kernel's times (bf16, one H200; docs/scan.md) stand beside them. On a TPU
(v4, v5e, v5p), pallas_tpu's expected times from the chip's issue rates (scan_tpu_estimate.py,
docs/scan.md) and measured / expected join the table. First, on a small shape, the value and every
gradient are checked against impl="reference" on this device.

Usage, from the repository root (about 4 minutes on an H200; `--smoke`: tiny shapes on a CPU):
  PYTHONPATH=. python3 benchmarks/scan.py [--scan.FIELD=VALUE ...] [--out DIR] [--results FILE]
On a TPU VM (auto is pallas_tpu there): launch/tpu.sh exec --worker=0 -- PYTHONPATH=.
  .venv/bin/python benchmarks/scan.py --results=/tmp/scan.md
"""

import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from benchmarks import results, scan_tpu_estimate
from configs import common
from dim_jax.ops import ScanConfig, selective_scan
from dim_jax.ops.scan import gpu, resolve_impl, tpu

# Flags of this script alone, not absl's global ones: other benchmarks import its helpers next to
# modules with flags of the same names (dim_jax.main's --out).
FLAGS = flags.FlagValues()
_SCAN = config_flags.DEFINE_config_dict(
  "scan", common.base_config().model.scan, "model.scan", flag_values=FLAGS
)
_OUT = flags.DEFINE_string(
  "out", os.environ.get("OUT"), "folder for the table and raw records", flag_values=FLAGS
)
_RESULTS = flags.DEFINE_string(
  "results", "benchmarks/RESULTS.md", "markdown file to append to", flag_values=FLAGS
)
_SMOKE = flags.DEFINE_bool(
  "smoke", False, "tiny shapes: checks the script on a CPU", flag_values=FLAGS
)

EXP_RATE = 132 * 16 * 1.98e9  # H200 special-function-unit exponentials per second
SHAPES = [  # (name, L, D, N, batch): DiM-H/2 on latents, batches that fill an H200
  ("H 256²", 366, 3072, 16, 64),
  ("H 512²", 1230, 3072, 16, 8),
  ("H 1024²", 4494, 3072, 16, 4),
  ("H 1536²", 9806, 3072, 16, 1),
  ("H 1536² no pads", 9216, 3072, 16, 1),
]
SMOKE_SHAPES = [("smoke", 37, 64, 4, 2)]
OFFICIAL = {
  (366, 64): (2.8, 9.6),
  (1230, 8): (1.4, 6.1),
  (4494, 4): (2.1, 9.6),
  (9216, 1): (0.92, 4.2),
}
ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias", "z")


def inputs(length, channels, state, batch, dtype=jnp.bfloat16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 9)
  rows, rows_n = (batch, length, channels), (batch, length, state)
  return dict(
    u=jax.random.normal(keys[0], rows, dtype),
    delta=(jax.random.normal(keys[1], rows) - 2.0).astype(dtype),
    A=-jnp.exp(jax.random.uniform(keys[2], (channels, state), minval=0.0, maxval=2.7)),
    B=jax.random.normal(keys[3], rows_n, dtype),
    C=jax.random.normal(keys[4], rows_n, dtype),
    D=jax.random.normal(keys[5], (channels,)),
    delta_bias=0.5 * jax.random.normal(keys[6], (channels,)),
    z=jax.random.normal(keys[7], rows, dtype),
    g=jax.random.normal(keys[8], rows, dtype),
  )


def make_fns(config: ScanConfig):
  """(forward, forward+backward) jitted functions of the ARGS tuple, and the plain forward."""

  def forward(u, delta, A, B, C, D, delta_bias, z):
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, z=z, config=config)

  def loss(args, g):
    return jnp.sum(forward(*args).astype(jnp.float32) * g.astype(jnp.float32))

  return jax.jit(forward), jax.jit(jax.grad(loss)), forward


def timed(fn, *args, target_s=0.05):
  """Median seconds per call: calls issued back to back, synchronised once per batch of them."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  reps = max(1, min(200, int(target_s / max(time.perf_counter() - t0, 1e-6))))
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return float(np.median(samples))


def rel_err(x, ref):
  x, ref = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, ref))
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(config: ScanConfig, shape) -> dict:
  """Max relative error of the value and every gradient against impl="reference"; fp32 and bf16."""
  errors = {}
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    x = inputs(*shape, dtype=dtype, seed=3)
    args = tuple(x[k] for k in ARGS)
    (f, grad, _), (ref_f, ref_grad, _) = make_fns(config), make_fns(ScanConfig("reference"))
    errs = [rel_err(f(*args), ref_f(*args))]
    errs += [rel_err(a, b) for a, b in zip(grad(args, x["g"]), ref_grad(args, x["g"]), strict=True)]
    name = jnp.dtype(dtype).name
    errors[name] = max(errs)
    if errors[name] > tol:
      raise AssertionError(f"{config} differs from impl='reference' in {name}: {errs}")
  return errors


def copy_bandwidth(size):
  x = jnp.arange(size, dtype=jnp.float32)
  return 2 * x.nbytes / timed(jax.jit(lambda a: a + 1.0), x)


def bounds(length, channels, state, batch, bandwidth):
  """Seconds of the binding floor, forward and forward+backward."""
  rows, rows_n = batch * length * channels * 2, batch * length * state * 2  # bf16 bytes
  fwd_bytes = 4 * rows + 2 * rows_n  # u, δ, z, B, C in; y out
  bwd_bytes = fwd_bytes + 3 * rows + 2 * rows_n  # again, and g in; du, dδ, dz, dB, dC out
  exps = batch * length * channels * state
  fwd = max(exps / EXP_RATE, fwd_bytes / bandwidth)
  return fwd, max(2 * exps / EXP_RATE, (fwd_bytes + bwd_bytes) / bandwidth)


def kept_bytes(fn, args):
  """Bytes of the VJP residuals that are not the inputs themselves."""
  _, vjp = jax.vjp(fn, *args)
  inputs_ = {a.unsafe_buffer_pointer() for a in args}
  leaves = (x for x in jax.tree.leaves(vjp) if isinstance(x, jax.Array))
  return sum(x.nbytes for x in leaves if x.unsafe_buffer_pointer() not in inputs_)


def measure(config: ScanConfig, shape, bandwidth) -> dict:
  length, channels, state, batch = shape
  x = inputs(*shape)
  args = tuple(x[k] for k in ARGS)
  forward, grad, plain = make_fns(config)
  fwd_bound, fb_bound = bounds(*shape, bandwidth)
  fwd, fb = timed(forward, *args), timed(grad, args, x["g"])
  impl = resolve_impl(config.impl)
  if impl == "pallas_gpu":  # the settings the kernel resolved for this shape
    k = gpu.launch(config, (batch, length, channels), True)
    impl += f" chunk {k.chunk}/{k.fwd_chunk} block {k.block_d}/{k.fwd_block_d} S{k.segments}"
  expected = (None, None)
  chip = scan_tpu_estimate.CHIPS.get(jax.devices()[0].device_kind)
  if impl == "pallas_tpu":
    impl += f" chunk {config.chunk or tpu.DEFAULT_CHUNK} block {tpu.DEFAULT_BLOCK_D}"
    if chip:
      expected = tuple(x * 1e3 for x in scan_tpu_estimate.expected_seconds(chip, *shape))
  return dict(
    launch=impl,
    L=length, D=channels, N=state, batch=batch, fwd_ms=fwd * 1e3, fb_ms=fb * 1e3,
    fwd_bound_ms=fwd_bound * 1e3, fb_bound_ms=fb_bound * 1e3, kept_gb=kept_bytes(plain, args) / 1e9,
    expected_fwd_ms=expected[0], expected_fb_ms=expected[1],
  )  # fmt: skip


def table(rows, header) -> str:
  on_tpu = any(r["expected_fwd_ms"] for _, r in rows)
  lines = [
    *header,
    "",
    "| shape (L, D, N, batch) | launch | fwd ms | bound | ratio | fwd+bwd ms | bound | ratio "
    "| kept GB | official CUDA fwd / fwd+bwd ms |"
    + (" TPU expected fwd / fwd+bwd ms | measured / expected |" if on_tpu else ""),
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if on_tpu else ""),
  ]
  for name, r in rows:
    official = OFFICIAL.get((r["L"], r["batch"])) if r["D"] == 3072 else None
    line = (
      f"| {name} ({r['L']}, {r['D']}, {r['N']}, {r['batch']}) | {r['launch']} | {r['fwd_ms']:.3f} "
      f"| {r['fwd_bound_ms']:.3f} | {r['fwd_ms'] / r['fwd_bound_ms']:.1f}x | {r['fb_ms']:.3f} "
      f"| {r['fb_bound_ms']:.3f} | {r['fb_ms'] / r['fb_bound_ms']:.1f}x | {r['kept_gb']:.2f} "
      f"| {' / '.join(map(str, official)) if official else '–'} |"
    )
    if on_tpu:
      line += (
        f" {r['expected_fwd_ms']:.3f} / {r['expected_fb_ms']:.3f} | "
        f"{r['fwd_ms'] / r['expected_fwd_ms']:.2f} / {r['fb_ms'] / r['expected_fb_ms']:.2f} |"
      )
    lines.append(line)
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = ScanConfig(**_SCAN.value)
  shapes = SMOKE_SHAPES if _SMOKE.value else SHAPES
  device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
  bandwidth = copy_bandwidth(2**20 if _SMOKE.value else 2**29)
  errors = check(config, (45, 24, 16, 2) if _SMOKE.value else (1030, 512, 16, 2))
  print(json.dumps(dict(device=device, copy_tb_s=bandwidth / 1e12, check=errors)), flush=True)
  rows = []
  for name, *shape in shapes:
    rows.append((name, measure(config, shape, bandwidth)))
    print(json.dumps(dict(shape=name, **rows[-1][1])), flush=True)
  text = table(
    rows,
    [
      f"## selective_scan, {datetime.date.today()}, {device}",
      f"Command: `PYTHONPATH=. python3 benchmarks/scan.py {' '.join(sys.argv[1:])}`. {config}; "
      f"bf16 inputs with z and the δ bias, float32 state. Copy bandwidth {bandwidth / 1e12:.2f} "
      "TB/s. Bound: the larger of the exponential and the byte floor (benchmarks/scan.py); ratio "
      f"= ms / bound. Checked against impl='reference' first: max relative error {errors}.",
    ],
  )
  print(text, flush=True)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "scan.md"), "w") as f:
      f.write(text)
  results.append(_RESULTS.value, "\n" + text)


if __name__ == "__main__":
  main(FLAGS(sys.argv))
