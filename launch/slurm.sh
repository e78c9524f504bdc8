#!/usr/bin/env bash
# Per-task entry point for SLURM (run by `srun` from launch/slurm.sbatch): one process per node,
# owning all of that node's GPUs. Sets the coordinator (first node of the job, port MMDIT_PORT or
# 12355), the process count and id from SLURM, then runs the trainer.
#
#   srun launch/slurm.sh [--dry-run] TRAIN_ARGS...       (inside an allocation)
#   launch/slurm.sh --dry-run --config C --workdir W     (anywhere: prints what a task would run)
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
NODES=${SLURM_JOB_NODELIST:-node[0-1]}
if command -v scontrol > /dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  HEAD=${MMDIT_HEAD_NODE:-$(echo "$NODES" | sed -E 's/\[([0-9]+).*\]/\1/; s/,.*//')}
fi
export MMDIT_COORDINATOR="$HEAD:${MMDIT_PORT:-12355}"
export MMDIT_NUM_PROCESSES="${SLURM_NTASKS:-2}"
export MMDIT_PROCESS_ID="${SLURM_PROCID:-0}"
CMD=(python3 -m mmdit.cli.train --no-progress "$@")

if [[ $DRY -eq 1 ]]; then
  echo "MMDIT_COORDINATOR=$MMDIT_COORDINATOR MMDIT_NUM_PROCESSES=$MMDIT_NUM_PROCESSES MMDIT_PROCESS_ID=$MMDIT_PROCESS_ID $(printf '%q ' "${CMD[@]}")"
  exit 0
fi
exec "${CMD[@]}"
