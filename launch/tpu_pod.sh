#!/usr/bin/env bash
# Trains on a multi-host Cloud TPU VM slice (v4/v5p/v6e pods): the same command on every worker,
# over `gcloud compute tpus tpu-vm ssh --worker=all`. JAX reads the slice layout from the TPU
# metadata (MMDIT_DISTRIBUTED=auto -> jax.distributed.initialize() without arguments).
#
#   launch/tpu_pod.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--dir REMOTE_DIR]
#                     [--sync] [--install] -- TRAIN_ARGS...
#
#   --sync     copy this checkout to REMOTE_DIR on every worker first (gcloud ... scp --recurse)
#   --install  pip install -e "REMOTE_DIR[tpu]" on every worker first
#   TRAIN_ARGS go to `python3 -m mmdit.cli.train`, e.g.
#     -- --config configs/unitalking.py --workdir gs://bucket/run1 --set mesh.fsdp=-1
# Records (--data or config.data.dir) and the workdir must be visible to every worker (GCS or a
# shared filesystem): orbax writes one checkpoint from all hosts, grain reads per-host shards.
set -euo pipefail

TPU=""; ZONE=""; PROJECT=""; DIR="mmdit"; DRY=0; SYNC=0; INSTALL=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --sync) SYNC=1; shift ;;
    --install) INSTALL=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "tpu_pod.sh: --tpu NAME and --zone ZONE are required" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone "$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && TARGET+=(--project "$PROJECT")
REPO=$(cd "$(dirname "$0")/.." && pwd)
TRAIN="cd $DIR && MMDIT_DISTRIBUTED=auto python3 -m mmdit.cli.train --no-progress $(printf '%q ' "$@")"

CMDS=()
[[ $SYNC -eq 1 ]] && CMDS+=("$(printf '%q ' "${GCLOUD[@]}" scp --recurse "$REPO" "$TPU:$DIR" "${TARGET[@]}")")
[[ $INSTALL -eq 1 ]] && CMDS+=("$(printf '%q ' "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "pip install -e '$DIR[tpu]'")")
CMDS+=("$(printf '%q ' "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "$TRAIN")")

for c in "${CMDS[@]}"; do
  if [[ $DRY -eq 1 ]]; then echo "$c"; else eval "$c"; fi
done
