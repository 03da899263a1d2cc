#!/usr/bin/env bash
# Session 29, call 3: the router's split in the dsv3-ep8 fp8 layer (fp8 shared expert), by hit count. The router
# tiles were tuned on the dsv3 preamble alone (session 14); in this layer the shared GEMM1 streams beside it and the
# routed chain waits for it. Variants, alternated: plan; rpps1 (ROUTER_PROGRAMS_PER_SM=1: at M = 1, 28
# splits of two 128-K steps instead of 56 of one: half the split-K atomics per logit);
# rk512 / rk1024 (ROUTER_NARROW_BLOCK_K; halved up to 4 rows, so at M = 1 tiles of 256 / 512 K
# instead of 128: 28 / 14 splits instead of 56, and as many atomic adds per logit).
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
V=(--variant plan: --variant rpps1:preamble.ROUTER_PROGRAMS_PER_SM=1 --variant rk512:preamble.ROUTER_NARROW_BLOCK_K=512
   --variant rk1024:preamble.ROUTER_NARROW_BLOCK_K=1024)
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 "${V[@]}" --profile-hits 1 > "$OUT/m1.log" 2>&1
echo "m1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0 \
  --rounds 2 "${V[@]}" > "$OUT/m4.log" 2>&1
echo "m4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json"
grep -A12 "one call's kernels" "$OUT/m1.log" | grep -B1 -A11 "plan M=1\|rpps1 M=1" | head -60
