#!/usr/bin/env bash
# Session 24, call 6: issue 6's dsv3-ep8 fp8 figures (fp8 shared expert) on the final code, on another machine than
# calls 4-5: the plan by hit count at M = 1 and 4 (the routed GEMM1 now split 4 ways at M = 4), seed 0 (the device time left).
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8" --m 1,4 --seeds 0 \
  --rounds 2 > "$OUT/log_ep8.txt" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ep8/by_hits.json" | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
