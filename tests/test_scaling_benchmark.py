"""The scaling benchmark (benchmarks/scaling.py): its reading of compiled collectives against a
hand-computed module, its batch search against brute force, and its --tiny table on 8 fake CPU
devices (structure, batches, efficiencies and which collectives each mesh compiles to)."""

import os
import re
import subprocess
import sys

import numpy as np

from benchmarks import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A while loop (5 trips) around an all-reduce, and each spelling of replica_groups.
HLO = """HloModule m, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %g = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%g), channel_id=1, replica_groups=[2,2]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[16,4], b: bf16[2,16], w: (s32[], f32[8])) -> f32[64,4] {
  %a = f32[16,4]{1,0} parameter(0)
  %b = bf16[2,16]{1,0} parameter(1)
  %w = (s32[], f32[8]{0}) parameter(2)
  %ag = f32[64,4]{1,0} all-gather(%a), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = bf16[2,8]{1,0} reduce-scatter(%b), channel_id=3, replica_groups=mesh['data'=2,'fsdp'=2] {'fsdp'}, dimensions={1}, to_apply=%add
  %ags = (f32[16,4]{1,0}, f32[64,4]{1,0}) all-gather-start(%a), channel_id=4, replica_groups={}, dimensions={0}
  %agd = f32[64,4]{1,0} all-gather-done(%ags)
  %loop = (s32[], f32[8]{0}) while(%w), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[64,4]{1,0} add(%ag, %agd)
}
"""  # noqa: E501


def test_collective_traffic_of_a_hand_written_module():
  traffic = scaling.collective_traffic(HLO, num_devices=4)
  # all-gather, group of 4, 1024-byte result: 3/4 of it sent; the async pair counts once.
  assert traffic["all-gather"].count == 2
  assert traffic["all-gather"].sent_bytes == 2 * 768
  # reduce-scatter over 'fsdp' (2 devices) to 32 bytes: a 64-byte payload, half of it sent.
  assert traffic["reduce-scatter"].count == 1 and traffic["reduce-scatter"].sent_bytes == 32
  # all-reduce of 32 bytes in groups of 2, five times: 2 × 1/2 × 32 bytes a trip.
  assert traffic["all-reduce"].count == 5 and traffic["all-reduce"].sent_bytes == 5 * 32
  assert traffic["all-to-all"].count == traffic["collective-permute"].count == 0


def test_batch_search_finds_the_largest_batch_that_fits():
  rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
  for _ in range(200):
    fixed, per_image, bend = rng.uniform(1, 100), rng.uniform(0.1, 10), rng.choice([0, 0.05])
    step, start = int(rng.integers(1, 9)), int(rng.integers(1, 64))
    limit = fixed + per_image * rng.uniform(0, 300)
    probes = []

    def plan(batch, fixed=fixed, per_image=per_image, bend=bend, probes=probes):
      probes.append(batch)
      return fixed + per_image * batch + bend * batch**2

    want = max((b for b in range(0, 2000, step) if plan(b) <= limit), default=0)
    probes.clear()
    got = scaling.search_largest(plan, limit, start, step)
    assert got == want, (got, want, probes)
    assert len(probes) == len(set(probes)), probes  # no batch compiled twice
    if bend == 0:  # exactly linear plans: the prediction lands at once
      assert len(probes) <= 4, probes


def test_mesh_shapes():
  assert scaling.mesh_shapes(8, ["data", "fsdp", "hybrid"]) == [(8, 1), (4, 2), (2, 4), (1, 8)]
  assert scaling.mesh_shapes(4, ["fsdp", "hybrid"]) == [(2, 2), (1, 4)]
  assert scaling.mesh_shapes(1, ["fsdp"]) == [(1, 1)]


def _cells(table: str, first: str) -> list[list[str]]:
  lines = [line for line in table.splitlines() if line.startswith(f"| {first}")]
  return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_tiny_table_on_eight_fake_devices(tmp_path):
  """One device, pure data parallel and FSDP over 8 fake devices: the appended table's batches,
  throughputs and efficiencies agree with each other, and each mesh compiles to the collectives
  it should (none on one device, no weight gathers under pure data parallelism)."""
  results = tmp_path / "RESULTS.md"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # Eight fake devices; LLVM's optimisations off halve the compile time of these small programs.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
  args = ["--tiny", "--devices", "1,8", "--meshes", "data,fsdp", "--results", str(results)]
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.scaling", *args],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = results.read_text()
  assert re.search(r"## Scaling over devices \(\d{4}-\d\d-\d\d, cpu ×8, jax ", text), text
  assert f"`python -m benchmarks.scaling {' '.join(args)}`" in text
  header = _cells(text, "devices")[0]
  assert len(header) == 15 and header[7] == "efficiency vs 1 device"
  rows = {(r[0], r[1]): r for r in _cells(text, "1 |") + _cells(text, "8 |")}
  assert sorted(rows) == [("1", "1×1"), ("8", "1×8"), ("8", "8×1")], sorted(rows)
  one = rows["1", "1×1"]
  for (devices, _), r in rows.items():
    batch, global_batch, step_ms, img_s = int(r[2]), int(r[3]), float(r[4]), float(r[5])
    assert global_batch == batch * int(devices) and batch == int(one[2])
    # Printed to 0.1 ms, 0.1 img/s and 0.1 %: allow those roundings and no more.
    rounding = 0.05 / step_ms + 0.05 / float(one[4])
    np.testing.assert_allclose(img_s, global_batch / step_ms * 1e3, rtol=rounding, atol=0.05)
    efficiency = float(r[7].rstrip("%")) / 100
    np.testing.assert_allclose(efficiency, float(one[4]) / step_ms, rtol=rounding, atol=5e-4)
    assert float(r[8]) > 0  # GiB planned per device
  ops = {key: [int(n) for n in r[11].split(" / ")] for key, r in rows.items()}
  assert ops["1", "1×1"] == [0] * 5 and float(one[12]) == 0
  assert ops["8", "8×1"][0] == 0 and ops["8", "8×1"][2] > 0  # gradients all-reduced, no gathers
  assert ops["8", "1×8"][0] > 0  # FSDP gathers its weights
