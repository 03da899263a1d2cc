#!/usr/bin/env bash
# Session 28, call 2: the shared GEMM1's weights asked of L2 while the norm runs (shared_expert.L2_PREFETCH_K:
# the first K elements of each of GEMM1's K ranges of every gate and up row, forked on the side stream before
# the norm). dsv3-ep8 fp8 (fp8 shared expert) by hit count, variants alternated:
#   plan    no prefetch (the code before)
#   pfN     the first N elements of each K range (M = 1: 4 ranges of 1792; 512 is 8.4 MB of 29.4)
# then the prefetch's GPU tests (its lines, and the layer's bits with and without it).
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
V=(--variant plan:)
for k in 512 1024; do V+=(--variant "pf$k:shared_expert.L2_PREFETCH_K=$k"); done
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 "${V[@]}" --profile-hits 0 > "$OUT/m1.log" 2>&1
echo "m1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 90 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0 \
  --rounds 2 --variant plan: --variant pf512:shared_expert.L2_PREFETCH_K=512 \
  > "$OUT/m4.log" 2>&1
echo "m4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json"
timeout -k 5 120 python -m pytest -q tests/test_shared_expert.py tests/test_layer.py -k "prefetch" -p no:warnings \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - START )) s"; tail -4 "$OUT/tests.log"
grep -A12 "one call's kernels" "$OUT/m1.log" | head -120
