#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Cloud TPU VMs and pods for dim_jax, driven with gcloud from your workstation.
#
# A pod runs one Python process per host, and every host must start the same command at once
# (jax.distributed.initialize() waits for all of them): hence `--worker=all` everywhere. The
# stale-holder clean-up in `stop` follows MaxText's multihost runner; the per-host set-up follows
# big_vision's run_tpu.sh. Usage text below; `--dry-run` prints each command instead of running it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$REPO/launch/common.sh"
REMOTE_TARBALL="dim_jax-src.tar.gz"
STOP_GRACE_S=120 # how long `stop` waits for a run to checkpoint after SIGTERM

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [options] COMMAND [command options]

Commands:
  create [--queued] [--spot | --reserved]
                  create the TPU VM; --queued asks for it as a queued resource of the same name
                  (the way to get large slices: wait for state ACTIVE with `status --queued`)
  status [--queued]
                  describe the TPU VM (or the queued resource)
  copy [--git URL [--ref REF]]
                  copy this checkout (tracked and untracked files, not git-ignored ones) to DIR on
                  every worker, or fetch REF (default: the remote's HEAD) of URL there with git
  setup           on every worker: a Python >= 3.12 venv DIR/.venv with jax[tpu] and
                  requirements.txt (launch/setup_host.sh; does nothing when already installed)
  run --config=FILE --workdir=DIR [more dim_jax.main flags]
                  start `python -m dim_jax.main ...` on every worker at once, detached, with
                  DIM_JAX_DISTRIBUTED=1 (dim_jax.main then calls jax.distributed.initialize());
                  each worker logs to DIR/logs/<time>-<hostname>.log. On a pod, --workdir must be
                  storage every host sees (gs://...). Paths are relative to DIR on the workers.
  logs [--worker=N|all]
                  stream the latest run's log (default: worker 0, which logs the metrics)
  exec [--worker=N|all] -- COMMAND...
                  run a shell command in DIR on the workers (default: all), e.g. to fetch data:
                  exec -- gcloud storage cp -r gs://BUCKET/latents .
  stop            on every worker: SIGTERM the latest run (it saves a checkpoint; waits up to
                  120 s), then kill -9 any process still holding the TPU (/dev/accel*,
                  /dev/vfio/*) and remove /tmp/libtpu_lockfile. Run it before `run`
                  when a previous run crashed or was interrupted.
  delete [--queued]
                  delete the TPU VM (--queued: the queued resource and its VM)

Options (flag or environment variable; options may also follow the command):
  --name=NAME           DIM_TPU_NAME         TPU VM name (required)
  --zone=ZONE           DIM_TPU_ZONE         default us-east5-a
  --accelerator=TYPE    DIM_TPU_ACCELERATOR  default v5p-8 (or v4-32, v5litepod-16, v6e-64, ...)
  --runtime=VERSION     DIM_TPU_RUNTIME      default for the accelerator: v4 tpu-ubuntu2204-base,
                                             v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                                             v6e v2-alpha-tpuv6e
  --project=PROJECT     DIM_TPU_PROJECT      default: gcloud's core/project
  --dir=DIR             DIM_TPU_DIR          code directory on the workers (under home): dim_jax
  --env=KEY=VALUE       (run; repeatable) set KEY on the workers, e.g. TFDS_DATA_DIR=gs://b/tfds
  --dry-run             print every command instead of running it
  -h, --help            this text

Example (a v5p-128 pod: 64 chips, 16 hosts):
  export DIM_TPU_NAME=dim-pod DIM_TPU_ZONE=us-east5-a DIM_TPU_ACCELERATOR=v5p-128
  launch/tpu.sh create --queued && launch/tpu.sh status --queued   # until state: ACTIVE
  launch/tpu.sh copy && launch/tpu.sh setup
  launch/tpu.sh run --config=configs/pretrain_256.py --workdir=gs://BUCKET/dim/run1 \
    --env=TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets
  launch/tpu.sh logs
  launch/tpu.sh stop && launch/tpu.sh delete --queued
EOF
}

# Runs a command, or with --dry-run prints it (one line, shell-quoted) instead.
run_cmd() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

gcloud_tpu() { # gcloud compute tpus SUBGROUP VERB NAME [flags]: zone and project added here.
  run_cmd gcloud compute tpus "$@" "--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"}
}

on_workers() { # WORKER COMMAND: run a shell command over ssh on the given worker(s).
  gcloud_tpu tpu-vm ssh "$NAME" "--worker=$1" "--command=$2"
}

# The runtime (TPU VM image) the Cloud TPU docs name for each generation; sets RUNTIME if unset.
resolve_runtime() {
  [[ -z $RUNTIME ]] || return 0
  case "$ACCELERATOR" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for --accelerator=$ACCELERATOR; pass --runtime=VERSION" \
      "(list them with: gcloud compute tpus tpu-vm versions list --zone=$ZONE)" ;;
  esac
}

cmd_create() {
  resolve_runtime
  if ((QUEUED)); then
    gcloud_tpu queued-resources create "$NAME" "--node-id=$NAME" \
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME" \
      ${PROVISIONING[@]+"${PROVISIONING[@]}"}
    echo "queued; wait for state ACTIVE: launch/tpu.sh --name=$NAME status --queued" >&2
  else
    gcloud_tpu tpu-vm create "$NAME" "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME" \
      ${PROVISIONING[@]+"${PROVISIONING[@]}"}
  fi
}

cmd_status() {
  if ((QUEUED)); then
    gcloud_tpu queued-resources describe "$NAME"
  else
    gcloud_tpu tpu-vm describe "$NAME"
  fi
}

cmd_copy() {
  local dir
  dir="$(quote "$REMOTE_DIR")"
  if [[ -n $GIT_URL ]]; then
    # Fetching into an existing checkout keeps its .venv; a full SHA works as REF too.
    on_workers all "mkdir -p $dir && cd $dir && { [ -d .git ] || git init -q; } &&\
 git fetch -q --depth=1 $(quote "$GIT_URL") $(quote "$GIT_REF") &&\
 git checkout -q --force FETCH_HEAD"
    return
  fi
  git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO is not a git checkout; use: launch/tpu.sh copy --git=URL"
  tarball="${TMPDIR:-/tmp}/dim_jax-src-$$.tar.gz" # global: the EXIT trap removes it
  local pack=(git -C "$REPO" ls-files -z --cached --others --exclude-standard)
  local tar=(tar -czf "$tarball" -C "$REPO" --null -T -)
  if ((DRY_RUN)); then
    echo "$(quote_all "${pack[@]}") | $(quote_all "${tar[@]}")"
  else
    trap 'rm -f "$tarball"' EXIT
    echo "+ packing $REPO (files git does not ignore) into $tarball" >&2
    "${pack[@]}" | "${tar[@]}"
  fi
  gcloud_tpu tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all
  on_workers all "mkdir -p $dir && tar -xzf $REMOTE_TARBALL -C $dir && rm -f $REMOTE_TARBALL"
}

cmd_setup() {
  on_workers all "cd $(quote "$REMOTE_DIR") && bash launch/setup_host.sh tpu"
}

cmd_run() {
  local arg has_config=0 has_workdir=0
  for arg in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
    case "$arg" in
      --config | --config=*) has_config=1 ;;
      --workdir | --workdir=*) has_workdir=1 ;;
    esac
  done
  ((has_config && has_workdir)) ||
    die "run needs --config=FILE and --workdir=DIR (on a pod, a gs:// path every host can reach)"
  # One timestamp for all workers, so their log names match; the hostname tells workers apart.
  # setsid + nohup + redirected stdio: the run outlives the ssh session that started it.
  local log env main
  log="$(date +%Y%m%d-%H%M%S)-\$(hostname).log"
  env="$(quote_all DIM_JAX_DISTRIBUTED=1 ${ENV_VARS[@]+"${ENV_VARS[@]}"})"
  main="$(quote_all .venv/bin/python -m dim_jax.main ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
  on_workers all "cd $(quote "$REMOTE_DIR") && mkdir -p logs && ln -sfn \"$log\" logs/latest.log\
 && { env $env setsid nohup $main > \"logs/$log\" 2>&1 < /dev/null & }\
 && echo \$! > logs/latest.pid"
  echo "started; follow with: launch/tpu.sh --name=$NAME logs" >&2
}

cmd_logs() {
  on_workers "${WORKER:-0}" "tail -n 200 -F $(quote "$REMOTE_DIR")/logs/latest.log"
}

cmd_exec() {
  ((${#MAIN_ARGS[@]})) || die "exec needs a command: launch/tpu.sh exec -- COMMAND..."
  on_workers "${WORKER:-all}" "cd $(quote "$REMOTE_DIR") && ${MAIN_ARGS[*]}"
}

cmd_stop() {
  local dir
  dir="$(quote "$REMOTE_DIR")"
  # SIGTERM lets the run save a checkpoint; then whatever still holds the TPU is killed, and the
  # libtpu lock file (which outlives a crashed run and blocks the next one) removed.
  on_workers all "pid=\$(cat $dir/logs/latest.pid 2>/dev/null) && kill \$pid 2>/dev/null &&\
 for _ in \$(seq $STOP_GRACE_S); do kill -0 \$pid 2>/dev/null || break; sleep 1; done;\
 rm -f $dir/logs/latest.pid;\
 sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9;\
 sudo rm -f /tmp/libtpu_lockfile"
}

cmd_delete() {
  if ((QUEUED)); then
    gcloud_tpu queued-resources delete "$NAME" --force
  else
    gcloud_tpu tpu-vm delete "$NAME"
  fi
}

# --- Arguments: options may come before or after the command; `--` ends option parsing. ---
NAME="${DIM_TPU_NAME:-}"
ZONE="${DIM_TPU_ZONE:-us-east5-a}"
ACCELERATOR="${DIM_TPU_ACCELERATOR:-v5p-8}"
RUNTIME="${DIM_TPU_RUNTIME:-}"
PROJECT="${DIM_TPU_PROJECT:-}"
REMOTE_DIR="${DIM_TPU_DIR:-dim_jax}"
DRY_RUN=0
QUEUED=0
PROVISIONING=()
GIT_URL=""
GIT_REF="HEAD"
WORKER=""
ENV_VARS=()
MAIN_ARGS=()
COMMAND=""

while (($#)); do
  SHIFT=1
  case "$1" in
    -h | --help) usage && exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --name=*) option_value "$@" && NAME="$VALUE" ;;
    --zone | --zone=*) option_value "$@" && ZONE="$VALUE" ;;
    --accelerator | --accelerator=*) option_value "$@" && ACCELERATOR="$VALUE" ;;
    --runtime | --runtime=*) option_value "$@" && RUNTIME="$VALUE" ;;
    --project | --project=*) option_value "$@" && PROJECT="$VALUE" ;;
    --dir | --dir=*) option_value "$@" && REMOTE_DIR="$VALUE" ;;
    --queued) QUEUED=1 ;;
    --spot | --reserved) PROVISIONING+=("$1") ;;
    --git | --git=*) option_value "$@" && GIT_URL="$VALUE" ;;
    --ref | --ref=*) option_value "$@" && GIT_REF="$VALUE" ;;
    --worker | --worker=*) option_value "$@" && WORKER="$VALUE" ;;
    --env | --env=*)
      option_value "$@"
      [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$VALUE'"
      ENV_VARS+=("$VALUE")
      ;;
    --)
      shift
      MAIN_ARGS+=("$@")
      break
      ;;
    -*)
      [[ $COMMAND == run || $COMMAND == exec ]] ||
        die "unknown option '$1' (see launch/tpu.sh --help)"
      MAIN_ARGS+=("$1") # a dim_jax.main flag
      ;;
    *)
      if [[ -z $COMMAND ]]; then
        COMMAND="$1"
      elif [[ $COMMAND == run || $COMMAND == exec ]]; then
        MAIN_ARGS+=("$1") # the value of a `--flag VALUE` pair, or a word of the command
      else
        die "unexpected argument '$1' after '$COMMAND' (see launch/tpu.sh --help)"
      fi
      ;;
  esac
  shift "$SHIFT"
done

[[ -n $COMMAND ]] || {
  usage >&2
  exit 2
}
[[ -n $NAME ]] || die "no TPU name: pass --name=NAME or set DIM_TPU_NAME"
((${#MAIN_ARGS[@]} == 0)) || [[ $COMMAND == run || $COMMAND == exec ]] ||
  die "unexpected arguments '${MAIN_ARGS[*]}' after '$COMMAND' (see launch/tpu.sh --help)"

case "$COMMAND" in
  create | status | copy | setup | run | logs | exec | stop | delete) "cmd_$COMMAND" ;;
  *) die "unknown command '$COMMAND'; one of: create status copy setup run logs exec stop delete" ;;
esac
