"""The launch scripts: the gcloud commands tpu.sh prints, and what their remote parts do when run.

No TPU or SLURM is reachable here, so `--dry-run` output is parsed with shlex (as a shell would)
and checked against hand-written commands; the shell snippets meant for the workers are run on
this machine against stand-ins (a fake `.venv/bin/python`, `sudo`, `lsof`, `uv`) to check their
effect. `test_two_local_processes_train_and_checkpoint` trains for real, with two JAX processes.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dim_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(REPO, "launch", "tpu.sh")
GPU_SH = os.path.join(REPO, "launch", "gpu.sh")
SETUP_SH = os.path.join(REPO, "launch", "setup_host.sh")
COMMON_SH = os.path.join(REPO, "launch", "common.sh")
NO_TPU_ENV = ("DIM_TPU_NAME", "DIM_TPU_ZONE", "DIM_TPU_ACCELERATOR", "DIM_TPU_RUNTIME")
NO_SLURM_ENV = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_LOCALID")


def _rng():
  seed = np.random.SeedSequence().entropy
  return np.random.default_rng(seed), seed


def _tricky_string(rng, n=12):
  """Characters a careless quoting breaks: spaces, both quotes, $, backslash, ;, &, |, *."""
  alphabet = list("ab Z9 '\"$\\;&|*()=-_/.:~`#")
  return "v" + "".join(rng.choice(alphabet, size=n))


def _run(script, *args, env=None, cwd=REPO, check=True):
  base = {k: v for k, v in os.environ.items() if k not in NO_TPU_ENV + NO_SLURM_ENV}
  proc = subprocess.run(
    ["bash", script, *args],
    capture_output=True,
    text=True,
    env={**base, **(env or {})},
    cwd=cwd,
    timeout=60,
  )
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(stdout):
  """Each printed line as the argv a shell would run."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _fake_python(path):
  """A stand-in interpreter that records its argv, environment and pid as JSON in its cwd."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(
      f"#!{sys.executable}\n"
      "import json, os, sys\n"
      "print('fake main started', flush=True)\n"
      "record = {'argv': sys.argv[1:], 'env': dict(os.environ), 'pid': os.getpid()}\n"
      "json.dump(record, open('record.json.tmp', 'w'))\n"
      "os.replace('record.json.tmp', 'record.json')\n"
    )
  os.chmod(path, 0o755)


def _wait_for(path, seconds=20.0):
  deadline = time.time() + seconds
  while not os.path.exists(path):
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.05)


# --- launch/tpu.sh -------------------------------------------------------------------------------


def test_tpu_run_on_v5p_128_starts_main_on_every_worker(tmp_path):
  rng, seed = _rng()
  value = _tricky_string(rng)
  steps = int(rng.integers(1, 10**6))
  out = _run(
    TPU_SH,
    "--dry-run",
    "--name=dim-pod",
    "--zone=us-east5-a",
    "--project=my-proj",
    "--accelerator=v5p-128",
    "run",
    "--config=configs/pretrain_256.py",
    "--workdir=gs://bucket/dim/run1",
    f"--config.train.num_steps={steps}",
    f"--env=ODD_VALUE={value}",
  ).stdout
  (argv,) = _commands(out)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dim-pod"], argv
  assert "--worker=all" in argv and "--zone=us-east5-a" in argv and "--project=my-proj" in argv
  remote = _option(argv, "--command")

  # What every worker does with it, here: a detached main with the distributed switch on.
  home = tmp_path / "home"
  _fake_python(str(home / "dim_jax" / ".venv" / "bin" / "python"))
  subprocess.run(["bash", "-c", remote], cwd=home, check=True, timeout=30)
  record_file = home / "dim_jax" / "record.json"
  _wait_for(str(record_file))
  record = json.loads(record_file.read_text())
  assert record["argv"] == [
    "-m",
    "dim_jax.main",
    "--config=configs/pretrain_256.py",
    "--workdir=gs://bucket/dim/run1",
    f"--config.train.num_steps={steps}",
  ], f"seed {seed}"
  assert record["env"]["DIM_JAX_DISTRIBUTED"] == "1"
  assert record["env"]["ODD_VALUE"] == value, f"quoting changed the value; seed {seed}"
  logs = home / "dim_jax" / "logs"
  assert int((logs / "latest.pid").read_text()) == record["pid"], "pid file names another process"
  log = os.readlink(logs / "latest.log")
  assert re.fullmatch(r"\d{8}-\d{6}-" + re.escape(socket.gethostname()) + r"\.log", log), log
  deadline = time.time() + 10
  while "fake main started" not in (logs / log).read_text():
    assert time.time() < deadline, "the run's output did not reach its log file"
    time.sleep(0.05)


def test_tpu_create_and_delete_for_a_v5p_128():
  common = ["--dry-run", "--name=dim-pod", "--zone=us-east5-a", "--accelerator=v5p-128"]
  (queued,) = _commands(_run(TPU_SH, *common, "create", "--queued", "--spot").stdout)
  assert queued == [
    "gcloud", "compute", "tpus", "queued-resources", "create", "dim-pod", "--node-id=dim-pod",
    "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot",
    "--zone=us-east5-a",
  ]  # fmt: skip
  (vm,) = _commands(_run(TPU_SH, *common, "create").stdout)
  assert vm == [
    "gcloud", "compute", "tpus", "tpu-vm", "create", "dim-pod", "--accelerator-type=v5p-128",
    "--version=v2-alpha-tpuv5", "--zone=us-east5-a",
  ]  # fmt: skip
  (delete,) = _commands(_run(TPU_SH, *common, "delete", "--queued").stdout)
  assert delete == [
    "gcloud", "compute", "tpus", "queued-resources", "delete", "dim-pod", "--force",
    "--zone=us-east5-a",
  ]  # fmt: skip
  env = {"DIM_TPU_NAME": "from-env", "DIM_TPU_ACCELERATOR": "v6e-64", "DIM_TPU_RUNTIME": "custom"}
  (from_env,) = _commands(_run(TPU_SH, "--dry-run", "create", env=env).stdout)
  assert from_env[5:] == [
    "from-env", "--accelerator-type=v6e-64", "--version=custom", "--zone=us-east5-a",
  ]  # fmt: skip


def test_tpu_copy_ships_the_files_git_keeps_and_setup_runs_on_all_workers(tmp_path):
  out = _run(TPU_SH, "--dry-run", "--name=pod", "copy", env={"TMPDIR": str(tmp_path)}).stdout
  pack, scp, unpack = out.splitlines()
  subprocess.run(["bash", "-c", pack], check=True, timeout=60)  # git ls-files | tar, locally
  scp = shlex.split(scp)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  tarball, target = scp[5], scp[6]
  assert target == "pod:dim_jax-src.tar.gz"
  home = tmp_path / "home"
  home.mkdir()
  shutil.copy(tarball, home / "dim_jax-src.tar.gz")  # what scp does
  unpack = shlex.split(unpack)
  assert "--worker=all" in unpack
  subprocess.run(["bash", "-c", _option(unpack, "--command")], cwd=home, check=True, timeout=60)
  tracked = subprocess.run(
    ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
  ).stdout.split()
  present = [f for f in tracked if os.path.exists(os.path.join(REPO, f))]
  assert all((home / "dim_jax" / f).exists() for f in present), "a tracked file was not copied"
  assert not (home / "dim_jax" / ".venv").exists() and not (home / "dim_jax" / ".git").exists()
  assert not (home / "dim_jax-src.tar.gz").exists()

  (setup,) = _commands(_run(TPU_SH, "--dry-run", "--name=pod", "setup").stdout)
  assert "--worker=all" in setup
  assert _option(setup, "--command") == "cd dim_jax && bash launch/setup_host.sh tpu"
  (cmd,) = _commands(_run(TPU_SH, "--dry-run", "--name=pod", "exec", "--", "ls", "-la").stdout)
  assert "--worker=all" in cmd and _option(cmd, "--command") == "cd dim_jax && ls -la"


def test_tpu_stop_terminates_the_run_then_kills_tpu_holders(tmp_path):
  """The stop snippet against stand-ins: `sudo` runs kill (not rm), `lsof` names a holder."""
  (argv,) = _commands(_run(TPU_SH, "--dry-run", "--name=pod", "stop").stdout)
  assert "--worker=all" in argv
  remote = _option(argv, "--command")
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  (home / "dim_jax" / "logs").mkdir(parents=True)
  bin_dir.mkdir()
  calls = tmp_path / "calls.txt"
  (bin_dir / "sudo").write_text(
    f'#!/bin/sh\necho "sudo $*" >> {calls}\n[ "$1" = rm ] || exec "$@"\n'
  )
  (bin_dir / "lsof").write_text(f'#!/bin/sh\necho "lsof $*" >> {calls}\necho "$HOLDER"\n')
  for f in ("sudo", "lsof"):
    os.chmod(bin_dir / f, 0o755)
  run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # exits on TERM
  holder = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
     "print('ready', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  # Reap them as soon as they end, as init does for a detached run (a zombie still answers kill -0).
  reapers = [threading.Thread(target=p.wait) for p in (run, holder)]
  try:
    assert holder.stdout.readline().strip() == "ready"
    for reaper in reapers:
      reaper.start()
    (home / "dim_jax" / "logs" / "latest.pid").write_text(f"{run.pid}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOLDER": str(holder.pid)}
    subprocess.run(["bash", "-c", remote], cwd=home, env=env, check=True, timeout=30)
    assert run.wait(timeout=10) == -15, "the run was not stopped with SIGTERM"
    assert holder.wait(timeout=10) == -9, "the process holding the TPU was not killed"
  finally:
    run.kill()
    holder.kill()
  log = calls.read_text().splitlines()
  assert "lsof -t /dev/accel* /dev/vfio/*" in log
  assert "sudo rm -f /tmp/libtpu_lockfile" in log
  assert not (home / "dim_jax" / "logs" / "latest.pid").exists()


def test_tpu_bad_arguments_fail_with_one_line():
  cases = [
    (["run", "--config=c.py", "--workdir=w"], "--name=NAME"),
    (["--name=p", "run", "--workdir=w"], "--config=FILE"),
    (["--name=p", "--accelerator=v9-8", "create"], "--runtime=VERSION"),
    (["--name=p", "launch"], "unknown command"),
    (["--name=p", "copy", "--bogus"], "unknown option '--bogus'"),
    (["--name=p", "--zone"], "--zone needs a value"),
  ]
  for args, expected in cases:
    proc = _run(TPU_SH, "--dry-run", *args, check=False)
    assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


# --- launch/gpu.sh -------------------------------------------------------------------------------


def test_gpu_plain_hosts_export_coordinator_count_and_index():
  rng, seed = _rng()
  n = int(rng.integers(2, 64))
  i = int(rng.integers(0, n))
  port = int(rng.integers(1024, 65536))
  out = _run(
    GPU_SH, "--dry-run", f"--coordinator=10.1.2.3:{port}", "--num-processes", str(n),
    f"--process-id={i}", "--python=python3", "--config=configs/pretrain_256.py:smoke",
    "--workdir=/shared/dim", "--config.train.batch_size=64",
  ).stdout  # fmt: skip
  (argv,) = _commands(out)
  pythonpath = REPO + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
  assert argv == [
    "env", f"DIM_JAX_COORDINATOR=10.1.2.3:{port}", f"DIM_JAX_NUM_PROCESSES={n}",
    f"DIM_JAX_PROCESS_ID={i}", f"PYTHONPATH={pythonpath}", "python3", "-m", "dim_jax.main",
    "--config=configs/pretrain_256.py:smoke", "--workdir=/shared/dim",
    "--config.train.batch_size=64",
  ], f"seed {seed}"  # fmt: skip


def test_gpu_slurm_reads_the_task_environment():
  rng, seed = _rng()
  ntasks = int(rng.integers(2, 256))
  procid = int(rng.integers(0, ntasks))
  job = int(rng.integers(1, 10**7))
  first = int(rng.integers(0, 500))
  env = {
    "SLURM_PROCID": str(procid),
    "SLURM_NTASKS": str(ntasks),
    "SLURM_NODELIST": f"gpu[{first:03d}-{first + 3:03d},900],login1",
    "SLURM_JOB_ID": str(job),
    "SLURM_LOCALID": "1",
    "CUDA_VISIBLE_DEVICES": "4,5,6,7",
  }
  if shutil.which("scontrol"):
    pytest.skip("scontrol is installed: it, not this script, expands the node list")
  args = ["--dry-run", "--python=python3", "--config=c.py", "--workdir=w"]
  (argv,) = _commands(_run(GPU_SH, *args, env=env).stdout)
  assert argv[1:4] == [
    f"DIM_JAX_COORDINATOR=gpu{first:03d}:{20000 + job % 10000}",
    f"DIM_JAX_NUM_PROCESSES={ntasks}",
    f"DIM_JAX_PROCESS_ID={procid}",
  ], f"seed {seed}"
  assert not any(a.startswith("CUDA_VISIBLE_DEVICES=") for a in argv)
  (argv,) = _commands(_run(GPU_SH, *args, "--gpu-per-process", env=env).stdout)
  assert "CUDA_VISIBLE_DEVICES=5" in argv  # SLURM_LOCALID 1 -> the second visible GPU


def test_gpu_local_processes_share_a_coordinator_and_one_failure_stops_all(tmp_path):
  out = _run(GPU_SH, "--dry-run", "--local=3", "--port=23456", "--config=c.py").stdout
  for i, argv in enumerate(_commands(out)):
    assert argv[1:4] == [
      "DIM_JAX_COORDINATOR=127.0.0.1:23456",
      "DIM_JAX_NUM_PROCESSES=3",
      f"DIM_JAX_PROCESS_ID={i}",
    ]
    assert f"CUDA_VISIBLE_DEVICES={i}" in argv
  assert len(_commands(out)) == 3

  fake = tmp_path / "python"
  fake.write_text(
    "#!/bin/sh\n"
    'echo "up $DIM_JAX_PROCESS_ID"\n'
    '[ "$DIM_JAX_PROCESS_ID" = 1 ] && exit 3\n'
    "exec sleep 60\n"
  )
  os.chmod(fake, 0o755)
  start = time.time()
  args = ["--local=3", "--port=23456", f"--python={fake}", "--config=c.py"]
  proc = _run(GPU_SH, *args, check=False)
  assert proc.returncode == 1, proc.stderr
  assert time.time() - start < 30, "the processes left waiting were not stopped"
  assert "error: process 1 failed" in proc.stderr
  assert sorted(line for line in proc.stdout.splitlines()) == ["[0] up 0", "[1] up 1", "[2] up 2"]


def test_gpu_bad_arguments_fail_with_one_line():
  cases = [
    (["--config=c.py"], "not under SLURM"),
    (["--coordinator=host", "--num-processes=2", "--process-id=0", "--config=c"], "HOST:PORT"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2", "--config=c"], "0..1"),
    (["--coordinator=h:1", "--process-id=0", "--config=c"], "--num-processes"),
    (["--local=0", "--config=c"], "--local needs"),
    ([], "no dim_jax.main flags"),
  ]
  for args, expected in cases:
    proc = _run(GPU_SH, "--dry-run", *args, check=False)
    assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
  proc = _run(
    GPU_SH, "--dry-run", "--local=3", "--config=c", env={"CUDA_VISIBLE_DEVICES": "0,1"}, check=False
  )
  assert proc.returncode == 2 and proc.stdout == "", "printed processes before refusing"


# --- launch/setup_host.sh ------------------------------------------------------------------------


def test_setup_host_installs_once_per_requirements(tmp_path):
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for script in (SETUP_SH, COMMON_SH):
    shutil.copy(script, repo / "launch")
  (repo / "requirements.txt").write_text("numpy>=2.0\n")
  (repo / ".venv" / "bin").mkdir(parents=True)
  (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "uv_calls.txt"
  (bin_dir / "uv").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
  for f in (repo / ".venv" / "bin" / "python", bin_dir / "uv"):
    os.chmod(f, 0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
  script = str(repo / "launch" / "setup_host.sh")
  expected = (
    f"pip install --python {repo}/.venv/bin/python jax[tpu]>=0.11.2 -r {repo}/requirements.txt"
  )
  _run(script, "tpu", env=env)
  _run(script, "tpu", env=env)  # up to date: no second install
  assert calls.read_text().splitlines() == [expected]
  (repo / "requirements.txt").write_text("numpy>=2.1\n")
  _run(script, "tpu", env=env)
  assert calls.read_text().splitlines() == [expected, expected]
  _run(script, "cpu", env=env)
  assert calls.read_text().splitlines()[-1] == expected.replace("jax[tpu]", "jax")


# --- lint ----------------------------------------------------------------------------------------


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck); scripts not linted")
  proc = subprocess.run(
    ["shellcheck", "-x", TPU_SH, GPU_SH, SETUP_SH, COMMON_SH],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


# --- two real JAX processes ----------------------------------------------------------------------


def test_two_local_processes_train_and_checkpoint_like_one(tmp_path):
  """Two CPU processes started by `gpu.sh --local=2` (gloo collectives over localhost) train
  three steps of a tiny demo model through jax.distributed and write one checkpoint together;
  each reads its half of every global batch, so the losses equal one process's with the same
  global batch (up to the order of the batch reduction: fp32 rounding)."""
  flags = ["--config=configs/demo.py", "--config.train.num_steps=3",
           "--config.train.batch_size=8", "--config.train.log_every=1",
           "--config.train.checkpoint_every=3", "--config.model.width=32",
           "--config.model.depth=5", "--config.model.patch_size=4", "--config.model.d_state=4",
           "--config.sample.num_images=0"]  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k not in NO_SLURM_ENV}
  env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  workdir = tmp_path / "two"
  proc = subprocess.run(
    ["bash", GPU_SH, "--local=2", f"--workdir={workdir}", *flags],
    capture_output=True, text=True, cwd=REPO, timeout=540, env=env,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for i in (0, 1):
    assert re.search(rf"^\[{i}\].*process {i} of 2", proc.stdout, re.M), f"process {i} not in job"
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == "3", steps  # the final step (Orbax also keeps the very first one)

  one = subprocess.run(
    [sys.executable, "-m", "dim_jax.main", f"--workdir={tmp_path / 'one'}", *flags],
    capture_output=True, text=True, cwd=REPO, timeout=540, env=env,
  )  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  want = metrics.logged_scalar(one.stderr, "loss")
  got = metrics.logged_scalar(proc.stdout, "loss", line_prefix="[0]")
  assert sorted(want) == sorted(got) == [1, 2, 3], (want, got)
  for step, loss in want.items():
    assert abs(got[step] - loss) <= 1e-4 * abs(loss), f"step {step}: {got[step]} vs {loss}"
