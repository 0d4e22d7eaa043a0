"""Selective-scan benchmark (issue 3): every impl's forward and forward+backward time per shape,
beside the exponential floor, the byte floor and the same-token-count cuDNN attention.

Shapes (L, D, N, batch) are DiM-H's at 256², 512², 1024², 1536² (pads included), the 1536² goal
shape without pads, and DiM-S/L widths at 256². Inputs u, δ, B, C, z in bf16; A, D, bias fp32.

  exp floor   batch·L·D·N exponentials over 132 SMs x 16 SFU lanes x 1.98 GHz (4.18 T/s);
              forward+backward counts them twice (the backward recomputes the decays)
  byte floor  each input read once and each output written once, over the copy bandwidth
              measured here (fwd: u, δ, z, B, C in, y out; bwd adds g in, du, dδ, dz, dB, dC out)
  fwd         the forward alone, as sampling runs it (the lanes kernel then keeps no states; its
              forward rows in RESULTS.md up to 2026-11-29 still include writing them)
  kept        bytes the VJP keeps for the backward beyond the inputs themselves
  temp        XLA's temporary buffers of the compiled forward+backward

Usage (repo root): PYTHONPATH=. python3 benchmarks/scan.py [--part tune|table|all|lanes]
  [--out DIR] [--results benchmarks/RESULTS.md] [--budget SECONDS] [--quick]
--part lanes (v2 kernel, impl="pallas_lanes"): checks it against impl="reference" on the GPU,
times LANES_SWEEPS (overrides of its defaults, each checked against the first) at the two goal
shapes, then the best setting at every shape; about 6 minutes on an H200 with --budget 300
(--budget 420 reaches every shape).
Only jax and numpy are needed.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import results
from dim_jax.ops import scan_pallas, scan_pallas_lanes
from dim_jax.ops.scan import selective_scan

EXP_RATE = 132 * 16 * 1.98e9  # H200 special-function-unit exponentials per second
SHAPES = [  # (name, L, D, N, batch)
  ("H 256²", 366, 3072, 16, 64),
  ("H 512²", 1230, 3072, 16, 8),
  ("H 1024²", 4494, 3072, 16, 4),
  ("H 1536²", 9806, 3072, 16, 1),
  ("H 1536² no pads (goal)", 9216, 3072, 16, 1),
  ("S 256²", 366, 1024, 16, 64),
  ("L 256²", 366, 2048, 16, 64),
]
# Official CUDA kernel on one H200 (reference/selective-scan.md §7), bf16, fwd / fwd+bwd ms.
OFFICIAL = {
  (366, 64): (2.8, 9.6),
  (1230, 8): (1.4, 6.1),
  (4494, 4): (2.1, 9.6),
  (9216, 1): (0.92, 4.2),
}
SMOKE = False  # --smoke: tiny shapes, for checking the script on a CPU
SMOKE_SHAPES = [("smoke", 37, 64, 16, 2)]
SMOKE_SWEEPS = {(37, 2): dict(fwd=[(8, 1, 16), (16, 1, 8)], bwd=[(4, 1, True)])}
# Pallas launch parameters tried at the goal shapes, (L, batch): forward (block_d, warps, chunk),
# backward (block_d, warps, prefetch).
TUNE_SWEEPS = {
  (9216, 1): dict(fwd=[(4, 1, 8), (4, 1, 4)], bwd=[]),
}
CHECK_IMPLS = (("pallas", {}),)  # (impl, kwargs) checked against the reference on the GPU
# Lanes kernel (part "lanes"): settings (overrides of the library's defaults, which are
# `scan_pallas_lanes.DEFAULTS` plus the computed segments and fwd_block_d) timed forward and
# forward+backward per (L, batch); the first of each list is the baseline the others are checked
# against. History in .notes/scan.md: session 3 added fast exps, the warp butterfly and 32
# segments; session 4 B/C broadcast by shuffles, fma, fast softplus/sigmoid (fast_act)
# and a forward chunk of its own (fwd_chunk, a divisor of chunk x save_every). save_every m > 1
# keeps one state per m chunks (m times less memory, one more pass of exps in the backward).
# chunk <= 4: chunk 8 took minutes of Triton compile on the H200.
LANES_SWEEPS = {
  (9216, 1): [dict(), dict(chunk=4)],
  (366, 64): [dict(), dict(fast_act=False)],
}
SMOKE_LANES_SWEEPS = {
  (37, 2): [dict(fast_exp=False, lane_reduce=False, fast_act=False),
            dict(segments=2, save_every=3, fwd_chunk=3)]
}  # fmt: skip
LANES_CHECKS = (  # fp32 with the sequence split (all four kernels), bf16 single pass, all paths
  (jnp.float32, dict(block_d=64, num_warps=2, chunk=4, segments=4)),
  (jnp.float32, dict(block_d=64, num_warps=1, chunk=2, segments=2, fast_exp=False,
                     fast_act=False)),
  (jnp.float32, dict(block_d=32, num_warps=1, chunk=2, segments=4, save_every=2, fwd_chunk=4)),
  (jnp.bfloat16, dict(block_d=32, num_warps=1, chunk=2, segments=1)),
)  # fmt: skip
# XLA impls are timed at these (L, batch) only (each costs minutes of compile on the device);
# reference/selective-scan.md §1 has them at 9216 x 1 as well.
XLA_SHAPES = {(366, 64), (1230, 8), (9216, 1)}
START = time.perf_counter()


def log(rec, out_dir):
  print(json.dumps(rec), flush=True)
  with open(os.path.join(out_dir, "scan_results.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\n")


def inputs(length, channels, state, batch, dtype=jnp.bfloat16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 9)
  shape, shape_n = (batch, length, channels), (batch, length, state)
  return dict(
    u=jax.random.normal(keys[0], shape, dtype),
    delta=(jax.random.normal(keys[1], shape) - 2.0).astype(dtype),
    A=-jnp.exp(jax.random.uniform(keys[2], (channels, state), minval=0.0, maxval=2.7)),
    B=jax.random.normal(keys[3], shape_n, dtype),
    C=jax.random.normal(keys[4], shape_n, dtype),
    D=jax.random.normal(keys[5], (channels,)),
    delta_bias=0.5 * jax.random.normal(keys[6], (channels,)),
    z=jax.random.normal(keys[7], shape, dtype),
    g=jax.random.normal(keys[8], shape, dtype),
  )


ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias", "z")


def make_fns(impl, **kwargs):
  """(forward, forward+backward) jitted functions of the ARGS tuple plus the cotangent g."""

  def fwd(u, delta, A, B, C, D, delta_bias, z):
    kernel = dict(pallas=scan_pallas.selective_scan_pallas,
                  pallas_lanes=scan_pallas_lanes.selective_scan_pallas_lanes).get(impl)  # fmt: skip
    if kernel is not None:
      rest = {k: v for k, v in kwargs.items() if k != "chunk"}
      return kernel(u, delta, A, B, C, D, delta_bias, True, z, kwargs.get("chunk"), **rest)
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, z=z, impl=impl)

  def loss(args, g):
    return jnp.sum(fwd(*args).astype(jnp.float32) * g.astype(jnp.float32))

  return jax.jit(fwd), jax.jit(jax.grad(loss)), fwd


def timed(fn, *args, target_s=0.05):
  """Median seconds per call: calls issued back to back, synchronised once per batch."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  reps = max(1, min(200, int(target_s / max(one, 1e-6))))
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return float(np.median(samples)), float(np.std(samples) / np.median(samples))


def rel_err(x, ref):
  x, ref = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, ref))
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def copy_bandwidth():
  x = jnp.arange(2**20 if SMOKE else 2**29, dtype=jnp.float32)  # 2 GiB
  t, _ = timed(jax.jit(lambda a: a + 1.0), x)
  return 2 * x.nbytes / t


def floors(length, channels, state, batch, bandwidth):
  bld, bln = batch * length * channels * 2, batch * length * state * 2  # bf16 bytes
  fwd_bytes = 4 * bld + 2 * bln
  bwd_bytes = (4 * bld + 2 * bln) + (3 * bld + 2 * bln)
  exps = batch * length * channels * state
  return dict(
    exp_fwd=exps / EXP_RATE, exp_fb=2 * exps / EXP_RATE,
    byte_fwd=fwd_bytes / bandwidth, byte_fb=(fwd_bytes + bwd_bytes) / bandwidth,
  )  # fmt: skip


def kept_bytes(fn, args):
  """Bytes of the VJP residuals that are not the inputs themselves."""
  _, vjp = jax.vjp(fn, *args)
  ptrs = {a.unsafe_buffer_pointer() for a in args}
  total = 0
  for leaf in jax.tree.leaves(vjp):
    if isinstance(leaf, jax.Array) and leaf.unsafe_buffer_pointer() not in ptrs:
      total += leaf.nbytes
  return total


def measure(name, impl, shape, x, out_dir, check=None, memory=True, fb=True, keep=None, **kwargs):
  """Times forward (and forward+backward) of one impl at one shape; logs one record. `check`:
  outputs (and grads) of a trusted impl named check["name"]; `keep`: a dict that receives this
  impl's outputs (and grads) for later checks."""
  length, channels, state, batch = shape
  fwd, grad, raw = make_fns(impl, **kwargs)
  args = tuple(x[k] for k in ARGS)
  rec = dict(kind="time", shape=name, impl=impl, L=length, D=channels, N=state, batch=batch)
  rec.update({k: v for k, v in kwargs.items()})
  vs = check.get("name", "chunked") if check else "chunked"
  try:
    t0 = time.perf_counter()
    fwd_s, rec["fwd_spread"] = timed(fwd, *args)
    rec["fwd_ms"] = fwd_s * 1e3
    rec["fwd_first_s"] = time.perf_counter() - t0
    if check is not None or keep is not None:
      out = fwd(*args)
      if check is not None:
        rec[f"fwd_rel_err_vs_{vs}"] = rel_err(out, check["out"])
      if keep is not None:
        keep.update(name=impl, out=out)
    if not fb:
      log(rec, out_dir)
      return rec
    t0 = time.perf_counter()
    fb_s = timed(grad, args, x["g"])
    rec["fb_ms"], rec["fb_spread"] = fb_s[0] * 1e3, fb_s[1]
    rec["fb_first_s"] = time.perf_counter() - t0
    if (check is not None and "grads" in check) or keep is not None:
      grads = grad(args, x["g"])
      if check is not None and "grads" in check:
        rec[f"grad_rel_err_vs_{vs}"] = max(
          rel_err(a, b) for a, b in zip(grads, check["grads"], strict=True)
        )
      if keep is not None:
        keep["grads"] = grads
    if memory:
      mem = grad.lower(args, x["g"]).compile().memory_analysis()
      rec["fb_temp_gb"] = mem.temp_size_in_bytes / 1e9
      rec["kept_gb"] = kept_bytes(raw, args) / 1e9
  except Exception as e:  # noqa: BLE001 (one failing variant must not stop the sweep)
    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  log(rec, out_dir)
  return rec


def attention_ms(length, channels, batch, out_dir, name):
  heads = channels // 2 // 64  # model width = channels / 2, head dim 64
  keys = jax.random.split(jax.random.key(1), 4)
  q, k, v, g = (jax.random.normal(kk, (batch, length, heads, 64), jnp.bfloat16) for kk in keys)
  rec = dict(kind="attention", shape=name, L=length, heads=heads, batch=batch)
  try:
    att = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    rec["fwd_ms"] = timed(att, q, k, v)[0] * 1e3
    fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(att(q, k, v) * g), argnums=(0, 1, 2)))
    rec["fb_ms"] = timed(fb, q, k, v)[0] * 1e3
  except Exception as e:  # noqa: BLE001
    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  log(rec, out_dir)
  return rec


def check_small(out_dir, checks=None):
  """Kernels against the sequential reference on the GPU, all grads: `checks` is a list of
  (dtype, impl, kwargs); by default CHECK_IMPLS with fp32 and bf16 inputs."""
  checks = checks or [(d, i, kw) for d in (jnp.float32, jnp.bfloat16) for i, kw in CHECK_IMPLS]
  for dtype, impl, kw in checks:
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    x = inputs(45 if SMOKE else 1030, 24 if SMOKE else 512, 16, 2, dtype, seed=3)
    args = tuple(x[k] for k in ARGS)
    want_f, want_g, _ = make_fns("reference")
    want_out, want_grads = want_f(*args), want_g(args, x["g"])
    f, gfn, _ = make_fns(impl, **kw)
    rec = dict(kind="check", impl=impl, dtype=jnp.dtype(dtype).name, tol=tol, **kw)
    try:
      errs = {"out": rel_err(f(*args), want_out)}
      grads = gfn(args, x["g"])
      errs.update({f"d{k}": rel_err(a, b) for k, a, b in zip(ARGS, grads, want_grads, strict=True)})
      rec.update(errs, max_rel_err=max(errs.values()), ok=all(v <= tol for v in errs.values()))
    except Exception as e:  # noqa: BLE001
      rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    log(rec, out_dir)


def over_budget(budget):
  return time.perf_counter() - START > budget


def tune(out_dir, budget):
  """Pallas launch parameters at the two goal shapes: forward (block_d, warps, chunk) first, then
  the backward's (block_d, warps, prefetch) with the best forward."""
  sweeps = SMOKE_SWEEPS if SMOKE else TUNE_SWEEPS
  best = {}
  for (length, batch), sweep in sweeps.items():
    shape = (length, 64 if SMOKE else 3072, 16, batch)
    x = inputs(*shape)
    name = f"tune L={length} b={batch}"
    _, ref_grad, _ = make_fns("chunked")
    args = tuple(x[k] for k in ARGS)
    check = dict(out=jax.jit(make_fns("chunked")[2])(*args), grads=ref_grad(args, x["g"]))
    fwd_best = None
    for bd, nw, chunk in sweep["fwd"]:
      if over_budget(budget):
        break
      kw = dict(block_d=bd, num_warps=nw, chunk=chunk, bwd_block_d=4, bwd_num_warps=1)
      rec = measure(name, "pallas", shape, x, out_dir, check=check, memory=False, **kw)
      if "fwd_ms" in rec and (fwd_best is None or rec["fwd_ms"] < fwd_best[0]):
        fwd_best = (rec["fwd_ms"], bd, nw, chunk, rec.get("fb_ms"))
    if fwd_best is None:
      continue
    _, bd, nw, chunk, fb_ms = fwd_best
    bwd_best = (fb_ms, 4, 1, False) if fb_ms else None
    for bbd, bnw, bpf in sweep["bwd"]:
      if over_budget(budget):
        break
      kw = dict(block_d=bd, num_warps=nw, chunk=chunk, bwd_block_d=bbd, bwd_num_warps=bnw)
      rec = measure(
        name, "pallas", shape, x, out_dir, check=check, memory=False, bwd_prefetch=bpf, **kw
      )
      if "fb_ms" in rec and (bwd_best is None or rec["fb_ms"] < bwd_best[0]):
        bwd_best = (rec["fb_ms"], bbd, bnw, bpf)
    best[(length, batch)] = dict(block_d=bd, num_warps=nw, chunk=chunk)
    if bwd_best:
      best[(length, batch)].update(
        bwd_block_d=bwd_best[1], bwd_num_warps=bwd_best[2], bwd_prefetch=bwd_best[3]
      )
    log(dict(kind="best", L=length, batch=batch, **best[(length, batch)]), out_dir)
  return best


def table(out_dir, budget, bandwidth, quick, impls):
  """The kernel at every shape first, then the XLA impls (cut first when time runs out)."""
  rows, attention = [], {}
  shapes = SMOKE_SHAPES if SMOKE else SHAPES[:2] if quick else SHAPES
  kernel_first = [i for i in impls if i == "pallas"] + [i for i in impls if i != "pallas"]
  for impl in kernel_first:
    for order, (name, length, channels, state, batch) in enumerate(shapes):
      if impl != "pallas" and (length, batch) not in XLA_SHAPES and not SMOKE:
        continue
      if over_budget(budget):
        log(dict(kind="skipped", shape=name, impl=impl, why="time budget"), out_dir)
        continue
      shape = (length, channels, state, batch)
      x = inputs(*shape)
      check = None
      if impl == "pallas":
        check = dict(out=jax.jit(make_fns("chunked")[2])(*(x[k] for k in ARGS)))
      if name not in attention:
        attention[name] = attention_ms(length, channels, batch, out_dir, name)
      rec = measure(name, impl, shape, x, out_dir, check=check)
      rows.append((order, rec, floors(*shape, bandwidth), attention[name]))
  rows.sort(key=lambda r: r[0])
  return [r[1:] for r in rows]


def lanes_resolved(shape, kw):
  """chunk, save_every and segments as the library resolves the overrides `kw`."""
  length, channels, _, batch = shape
  block_d = kw.get("block_d", scan_pallas_lanes.DEFAULTS["block_d"])
  segments = kw.get("segments") or scan_pallas_lanes.default_segments(
    batch, length, channels, block_d
  )  # fmt: skip
  chunk = kw.get("chunk", scan_pallas_lanes.DEFAULTS["chunk"])
  return chunk, kw.get("save_every", scan_pallas_lanes.DEFAULTS["save_every"]), segments


def lanes_kept_gb(shape, kw):
  """States the lanes kernel keeps for its backward (one (N, D) fp32 state per save_every chunks
  and sample; the length padded to segments x groups), plus ΣΔ per segment."""
  length, channels, state, batch = shape
  chunk, save_every, segments = lanes_resolved(shape, kw)
  seg_len = -(-length // segments)
  seg_groups = -(-seg_len // (chunk * save_every))
  return batch * channels * 4 * (segments * seg_groups * state + segments) / 1e9


def lanes_label(shape, kw):
  """The resolved chunk and segments, then the overrides of the defaults."""
  chunk, _, segments = lanes_resolved(shape, kw)
  rest = [f"{k}={v}" for k, v in kw.items() if k not in ("chunk", "segments")]
  return " ".join([f"pallas_lanes c{chunk} S{segments}", *rest])


def tune_lanes(out_dir, budget):
  """The lanes kernel's settings at the two goal shapes, forward and forward+backward, each checked
  against the first (the previous best, itself checked against the reference by `check_small`).
  Returns the rows and the fastest forward+backward setting keyed by (L, batch)."""
  rows, best = [], {}
  for (length, batch), sweep in (SMOKE_LANES_SWEEPS if SMOKE else LANES_SWEEPS).items():
    shape = (length, 64 if SMOKE else 3072, 16, batch)
    x = inputs(*shape)
    name = f"L={length} b={batch}"
    baseline, recs = {}, []
    for setting in sweep:
      if over_budget(budget):
        log(dict(kind="skipped", shape=name, setting=setting, why="time budget"), out_dir)
        continue
      kw = dict(setting)
      check = baseline if "grads" in baseline else None
      keep = None if baseline else baseline
      rec = measure(name, "pallas_lanes", shape, x, out_dir, check=check, keep=keep, memory=False,
                    **kw)  # fmt: skip
      rec.update(label=lanes_label(shape, kw), kept_gb=lanes_kept_gb(shape, kw), setting=kw)
      if "fb_ms" in rec:
        recs.append(rec)
    if not recs:
      continue
    pick = min(recs, key=lambda r: r["fb_ms"])  # the setting for training
    best[(length, batch)] = pick["setting"]
    rows.extend(recs)
    log(dict(kind="best_lanes", L=length, batch=batch, **best[(length, batch)]), out_dir)
  return rows, best


def lanes_table(out_dir, budget, bandwidth, tuned, best):
  """The tuned rows, then the best lanes setting at every other shape: batch <= 4 takes the
  L=9216 b=1 setting (sequence split), larger batches the L=366 b=64 one."""
  long_kw = best.get((9216, 1), {})
  wide_kw = best.get((366, 64), {})
  if SMOKE:
    long_kw = wide_kw = best.get((37, 2), {})
  rows = []
  for name, length, channels, state, batch in SMOKE_SHAPES if SMOKE else SHAPES:
    shape = (length, channels, state, batch)
    if over_budget(budget):
      log(dict(kind="skipped", shape=name, impl="pallas_lanes", why="time budget"), out_dir)
      continue
    att = attention_ms(length, channels, batch, out_dir, name)
    done = [r for r in tuned if (r["L"], r["D"], r["batch"]) == (length, channels, batch)]
    for rec in done:
      rows.append((dict(rec, shape=name), floors(*shape, bandwidth), att))
    if done:
      continue
    kw = long_kw if batch <= 4 else wide_kw
    rec = measure(name, "pallas_lanes", shape, inputs(*shape), out_dir, memory=False, **kw)
    rec.update(label=lanes_label(shape, kw), kept_gb=lanes_kept_gb(shape, kw))
    rows.append((rec, floors(*shape, bandwidth), att))
  return rows


def fmt(v, spec=".3f"):
  return "–" if v is None else format(v, spec)


def render(rows, bandwidth, device, command):
  lines = [
    f"## selective_scan (issue 3), {datetime.date.today()}, {device}",
    f"Command: `{command}`. Copy bandwidth measured: {bandwidth / 1e12:.2f} TB/s. bf16 inputs, "
    "fp32 state. Times in ms (median); floors: exp = exps / 4.18 T/s (fwd+bwd: twice), "
    "byte = bytes once / copy bandwidth; 'of floor' = floor / time. Official CUDA kernel from "
    "reference/selective-scan.md §7 (measured there, not here).",
    "",
    "| shape (L, D, N, batch) | impl | fwd | fwd+bwd | exp floor fwd / f+b "
    "| of exp floor fwd / f+b | byte floor fwd / f+b | of byte floor fwd / f+b | kept GB "
    "| f+b temp GB | cuDNN attn fwd / f+b | official fwd / f+b |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for rec, fl, att in rows:
    shape = f"{rec['shape']} ({rec['L']}, {rec['D']}, {rec['N']}, {rec['batch']})"
    if "error" in rec:
      lines.append(
        f"| {shape} | {rec.get('label', rec['impl'])} | error: {rec['error'][:80]} |" + " |" * 10
      )
      continue
    f, b = rec.get("fwd_ms"), rec.get("fb_ms")
    ef, eb, bf, bb = (fl[k] * 1e3 for k in ("exp_fwd", "exp_fb", "byte_fwd", "byte_fb"))
    off = OFFICIAL.get((rec["L"], rec["batch"])) if rec["D"] == 3072 else None
    lines.append(
      f"| {shape} | {rec.get('label', rec['impl'])} | {fmt(f)} | {fmt(b)} | {ef:.3f} / {eb:.3f} "
      f"| {fmt(ef / f if f else None, '.0%')} / {fmt(eb / b if b else None, '.0%')} "
      f"| {bf:.3f} / {bb:.3f} | {fmt(bf / f if f else None, '.0%')} / "
      f"{fmt(bb / b if b else None, '.0%')} | {fmt(rec.get('kept_gb'), '.2f')} "
      f"| {fmt(rec.get('fb_temp_gb'), '.2f')} | {fmt(att.get('fwd_ms'))} / {fmt(att.get('fb_ms'))} "
      f"| {f'{off[0]} / {off[1]}' if off else '–'} |"
    )
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--part", default="all", choices=["tune", "table", "all", "lanes"])
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/scan_bench"))
  p.add_argument("--results", default=None, help="append the table to this RESULTS.md")
  p.add_argument("--budget", type=float, default=540.0, help="seconds before skipping the rest")
  p.add_argument("--quick", action="store_true", help="first two shapes only")
  p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script on a CPU)")
  p.add_argument("--impls", default="pallas,reference,associative,chunked", help="table's impls")
  a = p.parse_args()
  global SMOKE
  SMOKE = a.smoke
  os.makedirs(a.out, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
  bandwidth = copy_bandwidth()
  log(dict(kind="device", device=device, copy_tb_s=bandwidth / 1e12), a.out)
  if a.part in ("tune", "all"):
    check_small(a.out)
    tune(a.out, a.budget)
  if a.part == "lanes":
    check_small(a.out, [(dtype, "pallas_lanes", kw) for dtype, kw in LANES_CHECKS])
    tuned, best = tune_lanes(a.out, a.budget)
    rows = lanes_table(a.out, a.budget, bandwidth, tuned, best)
  elif a.part in ("table", "all"):
    rows = table(a.out, a.budget, bandwidth, a.quick, a.impls.split(","))
  if a.part in ("table", "all", "lanes"):
    text = render(rows, bandwidth, device, "PYTHONPATH=. python3 " + " ".join(sys.argv))
    print(text, flush=True)
    with open(os.path.join(a.out, "RESULTS_block.md"), "w") as f:
      f.write(text)
    if a.results:
      results.append(a.results, "\n" + text)


if __name__ == "__main__":
  main()
