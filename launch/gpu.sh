#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Multi-process JAX on GPU hosts for dim_jax: one `python -m dim_jax.main` per process, told the
# coordinator, the process count and its own index through DIM_JAX_COORDINATOR,
# DIM_JAX_NUM_PROCESSES and DIM_JAX_PROCESS_ID, which dim_jax.main hands to
# jax.distributed.initialize(). Usage text below; `--dry-run` prints instead of running.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$REPO/launch/common.sh"

usage() {
  cat <<'EOF'
Usage:
  srun launch/gpu.sh [options] MAIN_FLAGS...      under SLURM: one task per process
  launch/gpu.sh --coordinator=HOST:PORT --num-processes=N --process-id=I [options] MAIN_FLAGS...
                                                  plain hosts: run once on each host, I = 0..N-1
  launch/gpu.sh --local=N [options] MAIN_FLAGS... N processes on this host, one GPU each

MAIN_FLAGS go to `python -m dim_jax.main` (--config=FILE --workdir=DIR ...). With several hosts,
--workdir must be storage that every host sees (checkpoints are written by all processes).

Under SLURM the coordinator is the first node of SLURM_NODELIST, the process count SLURM_NTASKS
and the index SLURM_PROCID. The usual layout is one task per node, each process driving all the
node's GPUs (sbatch --nodes=H --ntasks-per-node=1 --gpus-per-node=G); for one task per GPU use
--ntasks-per-node=G with --gpus-per-task=1 (or --gpu-per-process, below).

Options:
  --coordinator=HOST:PORT  process 0's host and a free port that every process can reach
  --num-processes=N        number of processes in the job
  --process-id=I           this process's index; process 0 hosts the coordinator service
  --local=N                start N processes here with coordinator 127.0.0.1:PORT; process i sees
                           only GPU i (the i-th entry of CUDA_VISIBLE_DEVICES when that is set).
                           Output lines are prefixed [i]; when one process fails, the others are
                           stopped (otherwise they would wait for it forever).
  --port=PORT              coordinator port under SLURM and with --local; default under SLURM
                           20000 + SLURM_JOB_ID % 10000, with --local a free port
  --gpu-per-process        under SLURM: the task with SLURM_LOCALID=K sees only GPU K
  --python=PATH            DIM_JAX_PYTHON; default .venv/bin/python when it exists, else python3
  --dry-run                print each process's environment and command instead of running it
  -h, --help               this text
EOF
}

# --- Arguments: our options anywhere; everything else goes to dim_jax.main. ---
COORDINATOR=""
NUM_PROCESSES=""
PROCESS_ID=""
LOCAL=""
PORT=""
GPU_PER_PROCESS=0
PYTHON="${DIM_JAX_PYTHON:-}"
DRY_RUN=0
MAIN_ARGS=()
while (($#)); do
  SHIFT=1
  case "$1" in
    -h | --help) usage && exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --coordinator | --coordinator=*) option_value "$@" && COORDINATOR="$VALUE" ;;
    --num-processes | --num-processes=*) option_value "$@" && NUM_PROCESSES="$VALUE" ;;
    --process-id | --process-id=*) option_value "$@" && PROCESS_ID="$VALUE" ;;
    --local | --local=*) option_value "$@" && LOCAL="$VALUE" ;;
    --port | --port=*) option_value "$@" && PORT="$VALUE" ;;
    --gpu-per-process) GPU_PER_PROCESS=1 ;;
    --python | --python=*) option_value "$@" && PYTHON="$VALUE" ;;
    --)
      shift
      MAIN_ARGS+=("$@")
      break
      ;;
    *) MAIN_ARGS+=("$1") ;;
  esac
  shift "$SHIFT"
done

is_count() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1)); }

((${#MAIN_ARGS[@]})) || die "no dim_jax.main flags; give at least --config=FILE --workdir=DIR"
[[ -z $PORT || $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
if [[ -z $PYTHON ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# Sets GPU to the one a process of local index $1 may use: that entry of CUDA_VISIBLE_DEVICES,
# or $1 itself. With a single visible GPU (SLURM's --gpus-per-task=1 bound it) that one is kept.
pick_gpu() {
  local visible=()
  IFS=, read -r -a visible <<<"${CUDA_VISIBLE_DEVICES:-}"
  if ((${#visible[@]} == 0)); then
    GPU="$1"
  elif ((${#visible[@]} == 1)); then
    GPU="${visible[0]}"
  elif (($1 < ${#visible[@]})); then
    GPU="${visible[$1]}"
  else
    die "process $1 needs a GPU but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#visible[@]}"
  fi
}

# The first host name of a SLURM node list such as "gpu[003-004,010],big7" (-> gpu003).
first_slurm_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local first="${1%%,*}"
  if [[ $1 =~ ^([^,\[]+)\[([^],-]+) ]]; then
    first="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  fi
  echo "$first"
}

free_port() { # python3 rather than $PYTHON, which may be a wrapper script
  local python
  python="$(command -v python3 || echo "$PYTHON")"
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# The command line of process $1 of $2 with coordinator $3, and GPU $4 ("" = leave as is).
process_command() {
  COMMAND=(env "DIM_JAX_COORDINATOR=$3" "DIM_JAX_NUM_PROCESSES=$2" "DIM_JAX_PROCESS_ID=$1"
    "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}")
  [[ -z $4 ]] || COMMAND+=("CUDA_VISIBLE_DEVICES=$4")
  COMMAND+=("$PYTHON" -m dim_jax.main "${MAIN_ARGS[@]}")
}

index_of() { # position of $1 among $2...
  local i=0 item
  for item in "${@:2}"; do
    [[ $item != "$1" ]] || echo "$i"
    i=$((i + 1))
  done
}

# Prefixes each line of standard input with "[$1] ".
prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

run_local() {
  is_count "$LOCAL" || die "--local needs a process count >= 1, got '$LOCAL'"
  [[ -n $PORT ]] || PORT="$(free_port)"
  local i pids=() running=() status=0
  for ((i = 0; i < LOCAL; i++)); do pick_gpu "$i"; done # fail before starting any process
  for ((i = 0; i < LOCAL; i++)); do
    pick_gpu "$i"
    process_command "$i" "$LOCAL" "127.0.0.1:$PORT" "$GPU"
    if ((DRY_RUN)); then
      quote_all "${COMMAND[@]}"
      echo
    else
      "${COMMAND[@]}" > >(prefix_lines "$i") 2>&1 &
      pids+=($!)
    fi
  done
  ((DRY_RUN)) && return
  trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM
  # Poll rather than `wait -n`: the first failure must stop the rest, which would otherwise wait
  # for it forever, and `wait PID` still returns a finished process's exit status.
  running=("${pids[@]}")
  while ((${#running[@]})); do
    sleep 1
    for i in "${!running[@]}"; do
      ! kill -0 "${running[i]}" 2>/dev/null || continue
      if ! wait "${running[i]}" && ((status == 0)); then
        status=1
        echo "error: process $(index_of "${running[i]}" "${pids[@]}") failed;" \
          "stopping the others" >&2
        kill "${pids[@]}" 2>/dev/null || true
      fi
      unset 'running[i]'
    done
    running=(${running[@]+"${running[@]}"})
  done
  return "$status"
}

run_one() { # process $1 of $2, coordinator $3, GPU $4
  process_command "$@"
  if ((DRY_RUN)); then
    quote_all "${COMMAND[@]}"
    echo
  else
    exec "${COMMAND[@]}"
  fi
}

if [[ -n $LOCAL ]]; then
  run_local
elif [[ -n $COORDINATOR$NUM_PROCESSES$PROCESS_ID ]]; then
  [[ $COORDINATOR =~ ^[^:]+:[0-9]+$ ]] ||
    die "--coordinator needs HOST:PORT (process 0's host and a free port), got '$COORDINATOR'"
  is_count "$NUM_PROCESSES" || die "--num-processes needs a count >= 1, got '$NUM_PROCESSES'"
  [[ $PROCESS_ID =~ ^[0-9]+$ && $PROCESS_ID -lt $NUM_PROCESSES ]] ||
    die "--process-id needs an index in 0..$((NUM_PROCESSES - 1)), got '$PROCESS_ID'"
  run_one "$PROCESS_ID" "$NUM_PROCESSES" "$COORDINATOR" ""
elif [[ -n ${SLURM_PROCID:-} ]]; then
  [[ -n ${SLURM_NTASKS:-} && -n ${SLURM_NODELIST:-} ]] ||
    die "SLURM_PROCID is set but SLURM_NTASKS or SLURM_NODELIST is not; start with srun"
  [[ -n $PORT ]] || PORT=$((20000 + ${SLURM_JOB_ID:-0} % 10000))
  GPU=""
  ((GPU_PER_PROCESS == 0)) || pick_gpu "${SLURM_LOCALID:-0}"
  run_one "$SLURM_PROCID" "$SLURM_NTASKS" "$(first_slurm_host "$SLURM_NODELIST"):$PORT" "$GPU"
else
  die "not under SLURM (no SLURM_PROCID): give --coordinator=HOST:PORT --num-processes=N" \
    "--process-id=I on each host, or --local=N for N processes on this host"
fi
