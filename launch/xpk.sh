#!/usr/bin/env bash
# Submits a training workload to a GKE cluster with XPK (TPU slices, multi-slice, or GPU node pools).
# XPK starts one container per host with the cluster environment JAX auto-detects
# (MMDIT_DISTRIBUTED=auto).
#
#   launch/xpk.sh [--dry-run] --cluster C --workload W --image IMAGE
#                 (--tpu-type v5p-64 [--num-slices S] | --device-type h100-80gb-8 --num-nodes K)
#                 [--project P] [--zone Z] -- TRAIN_ARGS...
#
# IMAGE must contain this package (`pip install -e .[tpu]` or `.[gpu]`). TRAIN_ARGS go to
# `python3 -m mmdit.cli.train`; with S > 1 slices set mesh.dcn.data=S (data parallel across DCN).
set -euo pipefail

CLUSTER=""; WORKLOAD=""; IMAGE=""; TPU_TYPE=""; SLICES=1; DEVICE_TYPE=""; NODES=1; PROJECT=""; ZONE=""; DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --cluster) CLUSTER="$2"; shift 2 ;;
    --workload) WORKLOAD="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --tpu-type) TPU_TYPE="$2"; shift 2 ;;
    --num-slices) SLICES="$2"; shift 2 ;;
    --device-type) DEVICE_TYPE="$2"; shift 2 ;;
    --num-nodes) NODES="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "xpk.sh: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$CLUSTER" && -n "$WORKLOAD" && -n "$IMAGE" ]] || { echo "xpk.sh: --cluster, --workload and --image are required" >&2; exit 2; }
if [[ -n "$TPU_TYPE" && -n "$DEVICE_TYPE" ]] || [[ -z "$TPU_TYPE" && -z "$DEVICE_TYPE" ]]; then
  echo "xpk.sh: give exactly one of --tpu-type (TPU) or --device-type (GPU)" >&2; exit 2
fi

ARGS=(xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --docker-image "$IMAGE")
if [[ -n "$TPU_TYPE" ]]; then ARGS+=(--tpu-type "$TPU_TYPE" --num-slices "$SLICES"); else ARGS+=(--device-type "$DEVICE_TYPE" --num-nodes "$NODES"); fi
[[ -n "$PROJECT" ]] && ARGS+=(--project "$PROJECT")
[[ -n "$ZONE" ]] && ARGS+=(--zone "$ZONE")
ARGS+=(--command "MMDIT_DISTRIBUTED=auto python3 -m mmdit.cli.train --no-progress $(printf '%q ' "$@")")

if [[ $DRY -eq 1 ]]; then printf '%q ' "${ARGS[@]}"; echo; else exec "${ARGS[@]}"; fi
