#!/usr/bin/env bash
# Session 24, call 4: the dsv3-ep8 fp8 layer (fp8 shared expert) by hit count on the current code, M = 1 (the plan)
# and M = 4 (the plan against the routed GEMM1 split 4 ways, the tuner's own pick in session 21, from a copy of the
# table), then one replay's kernels at M = 48 / 64 under h and h+gemm2 (session 23's prepared question) if time is left.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 > "$OUT/m1.log" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json" | tail -1
TABLE="expert_configs.TABLE_PATH='benchmarks/results/s24_experiments/table_ep8_m4_gemm1_split4.json'"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 230 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0 \
  --rounds 3 --variant plan: --variant "g1split4:$TABLE" > "$OUT/m4.log" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json" | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
