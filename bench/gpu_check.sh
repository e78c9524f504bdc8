#!/usr/bin/env bash
# The first thing to run when a GPU machine is at hand (about 8 minutes on one H100/H200):
#
#   1. the GPU kernel tests (pytest -m gpu tests/test_kernels_gpu.py): the Triton kernel compiled, not
#      interpreted;
#   2. the attention benchmark at 16k tokens, d=128: pallas vs cuDNN vs JAX's Mosaic FA3 kernel, every
#      mask (full, chunk_causal, local, nonjoint), fwd and fwd+bwd;
#   3. the train-step benchmark on the ~1B twin of UniTalking (15,161 tokens) with impl=auto, once on
#      its own mask (`full & no_peek` -> pallas) and once on `full` (-> cuDNN with lengths);
#   4. bench/stream.py: streaming generation, the demo_stream model and the Self-Forcing-sized
#      configs/stream_1p3b.py (4,680-token chunks, 4 steps, bf16).
#
# Every figure lands in bench/results/ (JSON per step plus gpu_check-<stamp>.log with each step's exit
# status). A failing step is recorded and the next one still runs; the script exits non-zero if any
# step failed. Goals to compare against (issue 10): pallas fwd full 16k >= 0.9x cuDNN; chunk_causal
# >= 2.5x faster than full at 16k.
#
#   bash bench/gpu_check.sh            # from the repository root
#   STEP_TIMEOUT=300 bash bench/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$RESULTS/gpu_check-$STAMP.log"
STEP_TIMEOUT=${STEP_TIMEOUT:-150}  # seconds per step; typical total ~6-8 min
PY=${PYTHON:-python3}
FAILED=()

step() { # step NAME COMMAND...: runs with a timeout, records the exit status, never aborts the script
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS rc=0
  timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$LOG" || rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
  return 0
}

{
  echo "gpu_check $STAMP"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())" || true
} 2>&1 | tee -a "$LOG"

step kernel_tests $PY -m pytest -q -p no:xdist -m gpu tests/test_kernels_gpu.py \
  --junitxml "$RESULTS/gpu_check-$STAMP-kernel_tests.xml"

step attention_16k $PY bench/attention.py --seqs 16384 --head-dim 128 --heads 24 \
  --masks full chunk_causal local nonjoint --impls pallas cudnn mosaic_fa3 \
  --warmup 2 --iters 10 --out "$RESULTS/attention-16k-$STAMP.json"

ONE_B=(--config configs/unitalking.py --mesh data=1 --batch 1 --steps 5 --warmup 2
  --set model.streams.video.dim=1024 --set model.streams.audio.dim=1024
  --set model.streams.video.ffn=4096 --set model.streams.audio.ffn=4096
  --set model.num_layers=24 --set model.heads=8 --set model.remat=full --set model.attention.impl=auto)

step train_step_1b_pallas $PY bench/train_step.py "${ONE_B[@]}" --set "model.mask=full & no_peek" \
  --tag unitalking-1b-auto-nopeek --out "$RESULTS/train_step-1b-nopeek-$STAMP.json"

step train_step_1b_cudnn $PY bench/train_step.py "${ONE_B[@]}" --set "model.mask=full" \
  --tag unitalking-1b-auto-full --out "$RESULTS/train_step-1b-full-$STAMP.json"

step stream_demo $PY bench/stream.py --chunks 220 --out "$RESULTS/stream-demo-$STAMP.json"
# Self-Forcing's shape (1.3B video stream, 480x832, chunk 3 latent frames, 4 steps): DiT frames/s (anchor 17 FPS
# with decode on one H100, goal 34); the Wan VAE decode is not in this figure.
step stream_1p3b $PY bench/stream.py --config configs/stream_1p3b.py --chunks 40 --decode-chunks 0 --no-recompute \
  --out "$RESULTS/stream-1p3b-$STAMP.json"

if [ ${#FAILED[@]} -ne 0 ]; then
  echo "gpu_check: failed steps: ${FAILED[*]} (log $LOG)" | tee -a "$LOG"
  exit 1
fi
echo "gpu_check: all steps passed (log $LOG)" | tee -a "$LOG"
