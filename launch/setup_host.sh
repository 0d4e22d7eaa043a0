#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# One host's Python environment for dim_jax: a Python >= 3.12 venv in .venv with JAX for this
# host's accelerator plus requirements.txt (this package, editable, at the versions of
# constraints.txt). Idempotent: a second run with the same requirements and accelerator does
# nothing, so `launch/tpu.sh setup` can run it on every worker of a pod.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$REPO/launch/common.sh"
VENV="$REPO/.venv"

usage() {
  cat <<'EOF'
Usage: launch/setup_host.sh [--dry-run] [tpu | cuda12 | cuda13 | cpu]

Creates .venv (Python >= 3.12; jax >= 0.11 needs it) and installs jax[ACCELERATOR] and
requirements.txt. Without an argument the accelerator is detected: a TPU VM (/dev/accel*,
/dev/vfio/*) gives tpu; nvidia-smi gives cuda13 for drivers >= 580 and cuda12 below; else cpu.
When no Python >= 3.12 is installed (TPU VM images ship 3.10), uv (from PyPI) provides one.
EOF
}

DRY_RUN=0
ACCEL=""
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage && exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    tpu | cuda12 | cuda13 | cpu) ACCEL="$arg" ;;
    *) die "unknown argument '$arg'; expected one of tpu, cuda12, cuda13, cpu (or none: detect)" ;;
  esac
done

run_cmd() {
  echo "+ $*" >&2
  ((DRY_RUN)) || "$@"
}

detect_accelerator() {
  if compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
    echo tpu
  elif command -v nvidia-smi >/dev/null 2>&1; then
    local driver
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
    driver="${driver%%.*}"
    if [[ $driver =~ ^[0-9]+$ ]] && ((driver >= 580)); then echo cuda13; else echo cuda12; fi
  else
    echo cpu
  fi
}

# The first interpreter >= 3.12 on PATH, or nothing.
find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
}

[[ -n $ACCEL ]] || ACCEL="$(detect_accelerator)"
if [[ $ACCEL == cpu ]]; then JAX="jax>=0.11.2"; else JAX="jax[$ACCEL]>=0.11.2"; fi
# The stamp names what was installed; it changes whenever the requirements or the JAX line do.
REQUIREMENTS=("$REPO/requirements.txt" "$REPO/constraints.txt" "$REPO/pyproject.toml")
STAMP="$VENV/.installed-$( (cat "${REQUIREMENTS[@]}" 2>/dev/null; echo "$JAX") | sha256sum | cut -c1-16)"
if [[ -f $STAMP ]]; then
  echo "$VENV is up to date ($JAX + requirements.txt)" >&2
  exit 0
fi

UV="$(command -v uv || true)"
[[ -n $UV || ! -x $HOME/.local/bin/uv ]] || UV="$HOME/.local/bin/uv"
if [[ ! -x $VENV/bin/python ]]; then
  PYTHON="$(find_python)"
  if [[ -n $PYTHON ]]; then
    run_cmd "$PYTHON" -m venv "$VENV"
  else
    if [[ -z $UV ]]; then
      run_cmd python3 -m pip install --user --quiet uv
      UV="$HOME/.local/bin/uv"
    fi
    run_cmd "$UV" venv --seed --python 3.12 "$VENV"
  fi
fi
# uv installs in seconds where pip takes about a minute; either gives the same environment.
cd "$REPO"  # requirements.txt installs "." editable
if [[ -n $UV ]]; then
  run_cmd "$UV" pip install --python "$VENV/bin/python" "$JAX" -r "$REPO/requirements.txt"
else
  run_cmd "$VENV/bin/python" -m pip install --quiet "$JAX" -r "$REPO/requirements.txt"
fi
if ((DRY_RUN)); then exit 0; fi
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "installed $JAX + requirements.txt into $VENV" >&2
