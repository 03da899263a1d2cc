#!/usr/bin/env bash
# Session 32 call 3. Call 2: at M = 4 one routing-and-alignment kernel (ROUTE_ALIGN_MAX_TILE=1024) and half the
# router's split-K programs (ROUTER_PROGRAMS_PER_SM=1) together took the fp8 shared expert's overlap ratio from
# 1.221-1.235 to 1.186 (after the norm 1.083 -> 1.040). Does the layer gain or lose by hit count with them?
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
MOE_FUSION_SHARED_FP8=1 timeout -k 5 300 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0,1 \
  --rounds 2 --variant plan: --variant ra1024:route_align_kernel.ROUTE_ALIGN_MAX_TILE=1024 \
  --variant rpps1_ra1024:preamble.ROUTER_PROGRAMS_PER_SM=1,route_align_kernel.ROUTE_ALIGN_MAX_TILE=1024 \
  > "$OUT/m4.log" 2>&1
echo "m4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json" | grep "^| dsv3"
