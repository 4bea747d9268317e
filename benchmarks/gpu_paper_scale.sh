#!/usr/bin/env bash
# The paper-scale device check (issue "Paper-scale speed", item 3), for a lent GPU:
#
#     OUT=/path/to/outdir bash benchmarks/gpu_paper_scale.sh
#
# Runs `benchmarks.gpu_paper_scale` once per model, each under its own timeout so that one
# that runs long still leaves the other's figures: ResNet-110 at 5,000 images (primal and
# dual, float64 solves, Retrain for all 40 epochs; then linearised: Full, Retrain and
# Fast-NTK in closed form from one Gram pass, Fast-NTK's distance to Retrain), then ViT-B/16 prompts at 5,000 images,
# 224x224, C = 20 (primal, float32; Retrain for RETRAIN_EPOCHS_VIT epochs, default 10).
# Both write into $OUT (gpu_paper_scale_<model>.{json,md}); the log goes to $OUT/log.txt.
# Assumes jax with CUDA, flax, optax, numpy, matplotlib; the package is used from the repo
# root via PYTHONPATH (no install, no neural-tangents needed: kernels use the built-in path).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_paper_scale}"
mkdir -p "$OUT/resnet110" "$OUT/vit_b16"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_ENABLE_X64=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
exec > >(tee -a "$OUT/log.txt") 2>&1
RC=0
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
timeout "${T_RESNET:-360}" "$PY" -m benchmarks.gpu_paper_scale --out "$OUT/resnet110" \
  --models resnet110 --linearized ${QUICK:+--quick --n 40 --retrain-epochs 2} || RC=$?
timeout "${T_VIT:-300}" "$PY" -m benchmarks.gpu_paper_scale --out "$OUT/vit_b16" \
  --models vit_b16 --batch-size 32 --retrain-epochs "${RETRAIN_EPOCHS_VIT:-10}" \
  ${QUICK:+--quick --n 40 --retrain-epochs 2} || RC=$?
echo "exit status $RC"
exit $RC
