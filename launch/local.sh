#!/usr/bin/env bash
# Runs N JAX processes on this machine (loopback coordinator), each with D fake CPU devices: the
# multi-host code path (jax.distributed, per-process data, orbax multi-host checkpoints) on a laptop.
#
#   launch/local.sh [--dry-run] [-n N] [-d D] [-p PORT] [--logdir DIR] [-- COMMAND ...]
#
# COMMAND defaults to `python3 -m mmdit.cli.train`; arguments after `--` that start with `-` are
# appended to it, e.g.
#   launch/local.sh -n 2 -d 4 -- --config configs/demo.py:tiny --workdir /tmp/run --set mesh.data=2 ...
#   launch/local.sh -n 2 -d 4 -- python3 my_script.py
# Each process gets MMDIT_COORDINATOR=127.0.0.1:PORT, MMDIT_NUM_PROCESSES=N, MMDIT_PROCESS_ID=i
# (read by mmdit.parallel.distributed.maybe_initialize), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=D. Process 0 prints to the terminal, the others
# to LOGDIR/process_<i>.log (default: a temp dir). If any process fails, the others are stopped
# and the exit status is the first failure's.
set -euo pipefail

N=2; D=4; PORT=""; DRY=0; LOGDIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    -n|--num-processes) N="$2"; shift 2 ;;
    -d|--devices-per-process) D="$2"; shift 2 ;;
    -p|--port) PORT="$2"; shift 2 ;;
    --logdir) LOGDIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (put the command after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 || "$1" == -* ]]; then
  set -- python3 -m mmdit.cli.train "$@"
fi
if [[ -z "$PORT" ]]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -z "$LOGDIR" ]]; then
  if [[ $DRY -eq 1 ]]; then LOGDIR='$TMPDIR/mmdit-local-XXXXXX'; else LOGDIR=$(mktemp -d -t mmdit-local-XXXXXX); fi
fi

env_for() {
  echo "MMDIT_COORDINATOR=127.0.0.1:$PORT MMDIT_NUM_PROCESSES=$N MMDIT_PROCESS_ID=$1" \
       "JAX_PLATFORMS=cpu XLA_FLAGS='${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D'"
}

if [[ $DRY -eq 1 ]]; then
  for ((i = 0; i < N; i++)); do
    out=$([[ $i -eq 0 ]] && echo "" || echo " > $LOGDIR/process_$i.log 2>&1")
    echo "$(env_for $i) $(printf '%q ' "$@")$out &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$LOGDIR"
PIDS=()
for ((i = 0; i < N; i++)); do
  (
    export MMDIT_COORDINATOR="127.0.0.1:$PORT" MMDIT_NUM_PROCESSES="$N" MMDIT_PROCESS_ID="$i" JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D"
    if [[ $i -eq 0 ]]; then exec "$@"; else exec "$@" > "$LOGDIR/process_$i.log" 2>&1; fi
  ) &
  PIDS+=($!)
done

status=0
remaining=${#PIDS[@]}
while [[ $remaining -gt 0 ]]; do
  set +e; wait -n "${PIDS[@]}"; rc=$?; set -e
  remaining=$((remaining - 1))
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local.sh: a process exited with status $rc; stopping the others (logs: $LOGDIR)" >&2
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  fi
done
exit $status
