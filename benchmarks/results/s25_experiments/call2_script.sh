#!/usr/bin/env bash
# Session 25, call 2: the plan by hit count on the final code (the same code as session 24's end) at M = 1 and 4, seed 1,
# on whatever H100 comes; then session 23's prepared timeline: why GEMM2 placed early loses at dsv3-ep8 M = 48 / 64.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_by_hits.py --out "$OUT/plan" --m 1,4 --seeds 1 \
  --rounds 2 > "$OUT/plan.log" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/plan/by_hits.json" | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
OUT="$OUT/timeline" bash benchmarks/results/s23_experiments/next_call_timeline_m48.sh
