#!/usr/bin/env bash
# The issue-4 benchmark on one CUDA GPU in bf16 (pure bf16 weights and AdamW), with model FLOPs
# utilisation; same code as the CPU run (bench_tdpo_step.py), sized to finish in under 5 minutes.
#   bash bench/gpu.sh                 # writes ${OUT:-bench}/results-gpu.json
#   BATCH=8 LENGTH=2048 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
OUT_DIR=${OUT:-bench}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout "${LIMIT_S:-290}" python bench/bench_tdpo_step.py --device cuda --dtype bf16 \
    --batch "${BATCH:-8}" --length "${LENGTH:-1024}" --vocab 49152 --vocab 151936 \
    --steps "${STEPS:-10}" --warmup "${WARMUP:-2}" --threads 8 --out "$OUT_DIR/results-gpu.json"
