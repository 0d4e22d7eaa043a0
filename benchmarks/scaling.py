"""Scaling of the DiM-H/2 training step over the devices of one host, one table per run.

Each row is train.py's step (`train_step.sharded_step`: the recipe's remat, donation, parameters
and optimizer state split over "fsdp", the batch over every device) on the first k devices, on
random 256² latents at a fixed batch per device (global batch = per-device batch × k), for every
(data, fsdp) mesh of k devices: (k, 1) pure data parallel, (1, k) FSDP over all, and the products
between. Columns:

  img/s, MFU     train_step.train_flops_per_image × images / s, against k × the bf16 matmul rate
                 measured on device 0 in the same run
  efficiency     img/s / (k × the one-device img/s)
  compile s      lowering and compiling the step (the persistent compilation cache, if set, counts)
  GiB planned    per device, from the compiled step: arguments + outputs - donated + temporaries
  GiB peak       the devices' own high-water mark where they report one (GPU, TPU), of those whose
                 mark rose during the row; it cannot be reset, so "≤ x" marks a row in which none
                 did
  collectives    all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute ops in
                 the compiled step (loop bodies times their trip counts), the bytes each device
                 sends in ring algorithms, and the time those take at the all-gather bandwidth
                 measured on the same devices: the collective time if none overlapped compute

--search adds the largest per-device batch that fits, for one device and for FSDP over all of them
(goal: at least 1.5× the one device's). A plan grows linearly with the batch, so each probe is a
compile whose plan is compared with the devices' memory limit (bytes_limit, or --memory-limit-gib)
and the next probe is the linear prediction; a timed run confirms the answer.

  python -m benchmarks.scaling                         # all devices of this host, every mesh
  python -m benchmarks.scaling --devices 1 --search    # the one-device row and its batch search
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.scaling --tiny
"""

import argparse
import dataclasses
import datetime
import functools
import math
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from benchmarks import results, train_step
from dim_jax import parallel
from dim_jax.configs import pretrain_256

GiB = 2**30

# ---------------------------------------------------------------- Meshes


def mesh_shapes(devices: int, kinds: list[str]) -> list[tuple[int, int]]:
  """(data, fsdp) sizes of `devices` devices: "data" (k, 1), "fsdp" (1, k), "hybrid" both > 1."""
  shapes = []
  for data in range(devices, 0, -1):
    fsdp, rest = divmod(devices, data)
    kind = "data" if fsdp == 1 else "fsdp" if data == 1 else "hybrid"
    if rest == 0 and (kind in kinds or devices == 1):
      shapes.append((data, fsdp))
  return shapes[:1] if devices == 1 else shapes


def sub_mesh(data: int, fsdp: int) -> jax.sharding.Mesh:
  """The recipe's ("data", "fsdp") mesh on the first data × fsdp devices."""
  axis_types = (AxisType.Auto,) * len(parallel.MESH_AXES)
  devices = jax.devices()[: data * fsdp]
  return jax.make_mesh((data, fsdp), parallel.MESH_AXES, axis_types=axis_types, devices=devices)


# ---------------------------------------------------------------- Collectives in the compiled step

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%\S+ = (?P<shape>.+?) (?P<op>[a-z][a-z0-9-]*)\((?P<rest>.*)$", re.M
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string, e.g. '(f32[2,3]{1,0}, bf16[4])' -> 32."""
  return sum(
    _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in _ARRAY.findall(shape)
  )


def _group_size(attributes: str, num_devices: int) -> int:
  """Devices in each replica group, from any of XLA's three spellings of replica_groups."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attributes)
  if named:  # mesh['data'=2,'fsdp'=4] {'fsdp'}
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
  if iota:  # [2,4]<=[8]: 2 groups of 4
    return int(iota.group(1).split(",")[-1])
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if listed:  # {{0,1,2,3},{4,5,6,7}}
    return len(listed.group(1).split(","))
  return num_devices  # replica_groups={}: all devices


def _computation_multiplicity(hlo: str) -> dict[str, int]:
  """How many times each computation of an HLO module runs per call of its entry: a while body
  runs its known trip count (1 when unknown) times per run of its caller."""
  blocks = re.split(r"\n(?=\S)", hlo)
  calls = {}  # computation -> [(callee, times)]
  entry = None
  for block in blocks:
    header = re.match(r"(ENTRY )?%?(\S+) ", block)
    if not header or "{" not in block.split("\n")[0]:
      continue
    name = header.group(2)
    entry = name if header.group(1) else entry
    edges = []
    for line in block.split("\n")[1:]:
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      body = re.search(r"body=%?([\w.-]+)", line)
      for callee in re.findall(
        r"(?:calls|to_apply|condition|branch_computations)=\{?%?([\w.-]+)", line
      ):
        edges.append((callee, 1))
      if body:
        edges.append((body.group(1), int(trips.group(1)) if trips else 1))
    calls[name] = edges
  times = {entry: 1}
  for block_name in reversed(list(calls)):  # callers are printed after their callees
    for callee, n in calls.get(block_name, []):
      times[callee] = times.get(callee, 0) + times.get(block_name, 0) * n
  return times


@dataclasses.dataclass
class Traffic:
  """Collective ops of one kind in a compiled step, per device per step."""

  count: int = 0
  sent_bytes: float = 0.0  # what each device sends, ring algorithms


def collective_traffic(hlo: str, num_devices: int) -> dict[str, Traffic]:
  """Collectives of a compiled (post-optimisation) HLO module, by kind.

  Bytes each device sends for a group of g devices and a full (gathered / reduced) payload N:
  all-gather, reduce-scatter and all-to-all (g-1)/g N, all-reduce 2 (g-1)/g N, permute N."""
  traffic = {kind: Traffic() for kind in COLLECTIVES}
  times = _computation_multiplicity(hlo)
  for block in re.split(r"\n(?=\S)", hlo):
    header = re.match(r"(?:ENTRY )?%?(\S+) ", block)
    n_runs = times.get(header.group(1), 1) if header else 1
    for m in _INSTRUCTION.finditer(block):
      op = m.group("op")
      kind = op.removesuffix("-start")
      if kind not in traffic:
        continue
      g = _group_size(m.group("rest"), num_devices)
      size = _array_bytes(m.group("shape"))
      if op == "all-gather-start":  # (inputs, outputs): outputs are g/(g+1) of the bytes
        size = size * g / (g + 1)
      elif op == "collective-permute-start":  # (input, output, contexts)
        size = size / 2
      payload = size * g if kind == "reduce-scatter" else size
      share = {"all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}.get(kind, (g - 1) / g)
      traffic[kind].count += n_runs
      traffic[kind].sent_bytes += n_runs * share * payload
  return traffic


def all_gather_bandwidth(mesh: jax.sharding.Mesh, nbytes: int) -> float:
  """Bytes per second each device sends when all-gathering `nbytes` over the mesh (bus
  bandwidth: (k-1)/k × nbytes / seconds), median of 5."""
  k = mesh.devices.size
  split = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
  x = jax.device_put(jnp.zeros((k, nbytes // 4 // k), jnp.float32), split)
  gather = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))
  gather(x).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    gather(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return (k - 1) / k * x.nbytes / statistics.median(times)


# ---------------------------------------------------------------- Measure


@dataclasses.dataclass
class Row:
  devices: int
  data: int
  fsdp: int
  batch: int  # per device
  compile_s: float
  planned_bytes: int  # per device, from the compiled step
  traffic: dict[str, Traffic]
  step_s: float | None = None  # None: did not run (error)
  error: str = ""
  peak_bytes: int | None = None  # the devices' high-water mark, where reported
  peak_rose: bool = True  # False: no device's mark rose in this row, its peak is <= peak_bytes


def _peaks(devices) -> list[int] | None:
  stats = [d.memory_stats() for d in devices]
  return None if any(s is None for s in stats) else [s.get("peak_bytes_in_use", 0) for s in stats]


class Steps:
  """The config's train step compiled per (data, fsdp, images per device), each once: the rows
  and the batch search share compiles. Also the initial train state, made once and kept on the
  host, since its init program costs as much to compile as the step (on a CPU)."""

  def __init__(self, config):
    self.config = config
    self.compiled = {}
    self._host_state = None

  def __call__(self, data: int, fsdp: int, batch: int):
    """compile_step's tuple; leaves config.train.batch_size at this global batch."""
    self.config.train.batch_size = batch * data * fsdp
    if (data, fsdp, batch) not in self.compiled:
      self.compiled[data, fsdp, batch] = train_step.compile_step(self.config, sub_mesh(data, fsdp))
    return self.compiled[data, fsdp, batch]

  def initial_state(self, init_state, sharding):
    """The train state placed with `sharding`."""
    if self._host_state is None:
      self._host_state = jax.device_get(jax.jit(init_state)())
    return jax.device_put(self._host_state, sharding)

  def planned_bytes(self, data: int, fsdp: int, batch: int) -> int:
    """Per device: arguments + outputs - donated + temporaries of the compiled step."""
    return train_step.planned_bytes(self(data, fsdp, batch)[0])


def measure(steps: Steps, data: int, fsdp: int, batch: int, iters: int) -> Row:
  """Times the step on a (data, fsdp) mesh at `batch` images per device."""
  compiled, init_state, state_sharding, batch_sharding, compile_s = steps(data, fsdp, batch)
  devices = list(sub_mesh(data, fsdp).devices.flat)
  row = Row(
    devices=data * fsdp,
    data=data,
    fsdp=fsdp,
    batch=batch,
    compile_s=compile_s,
    planned_bytes=steps.planned_bytes(data, fsdp, batch),
    traffic=collective_traffic(compiled.as_text(), data * fsdp),
  )
  before = _peaks(devices)
  try:
    state = steps.initial_state(init_state, state_sharding)
    images = jax.device_put(train_step.random_batch(steps.config), batch_sharding)
    row.step_s = train_step.median_step_seconds(compiled, state, images, iters)
  except Exception as e:  # out of memory and friends: report, do not stop the table
    row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}".replace("|", "/")
  after = _peaks(devices)
  if after is not None:  # the marks of the devices that rose were reached in this row
    rose = [a for a, b in zip(after, before, strict=True) if a > b]
    row.peak_bytes, row.peak_rose = max(rose or after), bool(rose)
  return row


def search_largest(plan, limit: int, start: int, step: int) -> int:
  """Largest multiple of `step` whose plan(batch) <= limit (0 if none), for a plan that grows with
  the batch. Each probe is a call of `plan` (a compile); the next one is the linear prediction from
  the two largest batches planned so far, kept strictly between the largest batch known to fit and
  the smallest known not to, so the search ends however the plans bend."""
  plans = {}
  fits, fails = 0, None
  probe = max(start // step, 1) * step
  while fails is None or fails - fits > step:
    plans[probe] = plan(probe)
    if plans[probe] <= limit:
      fits = probe
    else:
      fails = probe
    guess = 2 * probe
    if len(plans) > 1:
      (b0, p0), (b1, p1) = sorted(plans.items())[-2:]
      slope = (p1 - p0) / (b1 - b0)
      guess = int(b1 + (limit - p1) / slope) if slope > 0 else guess
    probe = max(guess // step * step, fits + step)
    probe = probe if fails is None else min(probe, fails - step)
  return fits


# ---------------------------------------------------------------- Table


def _gib(nbytes) -> str:
  return f"{nbytes / GiB:.4g}"


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def scaling_table(rows: list[Row], flops: float, peak: float, bandwidth: dict) -> list[str]:
  """Markdown lines: a header and one line per row; efficiency against the one-device row."""
  one = next((r for r in rows if r.devices == 1 and r.step_s), None)
  titles = [
    "devices",
    "mesh data×fsdp",
    "batch per device",
    "global batch",
    "step ms",
    "img/s",
    f"MFU vs devices × {peak / 1e12:.3g} TFLOP/s",
    "efficiency vs 1 device",
    "GiB planned per device",
    "GiB peak per device",
    "compile s",
    "all-gather / reduce-scatter / all-reduce / all-to-all / permute ops",
    "GiB sent per device",
    "collective ms at measured bandwidth",
    "collective % of step",
  ]
  lines = [_row(titles), _row("---:" for _ in titles)]
  for r in rows:
    cells = [r.devices, f"{r.data}×{r.fsdp}", r.batch, r.batch * r.devices]
    sent = sum(t.sent_bytes for t in r.traffic.values())
    collective_s = sent / bandwidth[r.devices] if r.devices > 1 else 0.0
    if r.step_s is None:
      cells += [r.error, "", "", ""]
    else:
      img_s = r.batch * r.devices / r.step_s
      cells += [f"{r.step_s * 1e3:.1f}", f"{img_s:.1f}", f"{flops * img_s / peak / r.devices:.1%}"]
      cells.append(f"{one.step_s / r.step_s:.1%}" if one and one.batch == r.batch else "")
    peak_bytes = "" if r.peak_bytes is None else ("" if r.peak_rose else "≤ ") + _gib(r.peak_bytes)
    cells += [_gib(r.planned_bytes), peak_bytes, f"{r.compile_s:.1f}"]
    cells.append(" / ".join(str(r.traffic[k].count) for k in COLLECTIVES))
    cells += [_gib(sent), f"{collective_s * 1e3:.1f}"]
    cells.append(f"{collective_s / r.step_s:.0%}" if r.step_s else "")
    lines.append(_row(cells))
  return lines


def search_table(steps: Steps, args, devices: int, limit: int) -> list[str]:
  """The largest per-device batch whose plan fits `limit` and that runs, for one device and for
  FSDP over `devices`, and their ratio."""
  step = args.search_step
  lines = [
    f"| devices | mesh data×fsdp | largest batch per device within {_gib(limit)} GiB | "
    f"GiB planned | GiB planned at {step} more | step ms | img/s |",
    _row(["---:"] * 7),
  ]
  found = {}
  for fsdp in dict.fromkeys([1, devices]):
    plan = functools.partial(steps.planned_bytes, 1, fsdp)
    fits = search_largest(plan, limit, args.batch, step)
    row = None
    for batch in range(fits, max(fits - 3 * step, 0), -step):  # the allocator may need more
      row = measure(steps, 1, fsdp, batch, args.iters)
      if row.step_s is not None:
        break
    found[fsdp] = row.batch if row and row.step_s else 0
    cells = [fsdp, f"1×{fsdp}", found[fsdp] or "none", "", "", "", ""]
    if found[fsdp]:
      cells[3:] = [_gib(row.planned_bytes), _gib(plan(row.batch + step))]
      cells += [f"{row.step_s * 1e3:.1f}", f"{row.batch * fsdp / row.step_s:.1f}"]
    lines.append(_row(cells))
    print(lines[-1], flush=True)
  if devices > 1 and found[1]:
    ratio = found[devices] / found[1]
    lines += ["", f"FSDP over {devices} devices fits {ratio:.2f}× the batch of one (goal ≥ 1.5×)."]
  return lines


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2,4,8", help="device counts (those this host has)")
  p.add_argument("--meshes", default="data,fsdp,hybrid", help="mesh kinds for k > 1 devices")
  p.add_argument("--batch", type=int, default=64, help="images per device")
  p.add_argument("--scan-impl", default="auto")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--search", action="store_true", help="largest batch: 1 device vs FSDP over all")
  p.add_argument("--search-step", type=int, default=8, help="batch granularity of the search")
  p.add_argument("--memory-limit-gib", type=float, default=0.0, help="0: the devices' own")
  p.add_argument("--tiny", action="store_true", help="a tiny DiM, for CPU (fake devices)")
  p.add_argument("--results", default=None, help="default benchmarks/RESULTS.md; --tiny: none")
  args = p.parse_args(argv)
  if args.tiny:
    args.batch, args.iters, args.search_step = 2, 2, 1
  if args.results is None:
    args.results = "" if args.tiny else "benchmarks/RESULTS.md"
  remat = pretrain_256.get_config().model.remat
  image = 64 if args.tiny else 256  # tiny: 54 tokens a block, not 366
  config = train_step.config_for("H/2", image, args.batch, remat, args.scan_impl, args.tiny)
  flops = train_step.train_flops_per_image(config.model)
  peak = train_step.matmul_rate(256 if args.tiny else 8192)
  counts = [k for k in map(int, args.devices.split(",")) if k <= jax.device_count()]
  if not counts:
    sys.exit(f"--devices={args.devices}: this host has {jax.device_count()} devices.")
  gathered = 2**22 if args.tiny else 2**30
  bandwidth = {k: all_gather_bandwidth(sub_mesh(1, k), gathered) for k in counts if k > 1}

  steps = Steps(config)
  rows = []
  for k in counts:
    for data, fsdp in mesh_shapes(k, args.meshes.split(",")):
      rows.append(measure(steps, data, fsdp, args.batch, args.iters))
      print(scaling_table(rows, flops, peak, bandwidth)[-1], flush=True)
  lines = scaling_table(rows, flops, peak, bandwidth)
  if bandwidth:
    rates = ", ".join(f"{k} devices {b / 1e9:.1f} GB/s" for k, b in bandwidth.items())
    lines += ["", f"All-gather bandwidth (bytes each device sends per second): {rates}."]
  if args.search:
    limit = int(args.memory_limit_gib * GiB)
    limit = limit or min((d.memory_stats() or {}).get("bytes_limit", 0) for d in jax.devices())
    if not limit:
      sys.exit("--search: the devices report no memory limit; give --memory-limit-gib.")
    lines += ["", *search_table(steps, args, max(counts), limit)]
  print("\n".join(lines))
  if args.results:
    device = f"{jax.devices()[0].device_kind} ×{jax.device_count()}"
    results.append(
      args.results,
      f"\n## Scaling over devices ({datetime.date.today()}, {device}, jax {jax.__version__})\n\n"
      f"`python -m benchmarks.scaling {' '.join(argv)}`\n\n" + "\n".join(lines),
    )


if __name__ == "__main__":
  main(sys.argv[1:])
