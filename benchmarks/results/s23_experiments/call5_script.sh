#!/usr/bin/env bash
# Session 23, call 5: issue 6's dsv3-ep8 fp8 figures (fp8 shared expert) on the final code, by hit count at the bench's
# routing: the plan at M = 1 and 4 (EXPERT_PDL=auto: h at M = 1, GEMM2 placed early in both launches at M = 4).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8" --m 1,4 --seeds 0 \
  --rounds 2 > "$OUT/log_ep8.txt" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ep8/by_hits.json" | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
