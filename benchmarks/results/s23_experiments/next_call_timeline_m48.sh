#!/usr/bin/env bash
# Prepared in session 23, not run (no machine came): why GEMM2 placed early loses at dsv3-ep8 M >= 36 (routed launch)
# and M >= 32 (the shared expert's, +6-7 us at M = 48-64). One replay's kernels at M = 48 and 64 under h and under
# h+gemm2 (both launches early), with the kernels' registers and shared memory: does the early GEMM2 of one stream
# start before the other stream's GEMM1 has its programs placed, and how long do its programs wait? ~2 minutes.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
for mode in h h+gemm2; do
  MOE_FUSION_EXPERT_PDL=$mode timeout -k 5 120 python benchmarks/gpu_layer_timeline.py --shape dsv3-ep8 --dtype fp8 \
    --m 48,64 --resources --out "$OUT/$mode" > "$OUT/timeline_$mode.txt" 2>&1
  tail -n 40 "$OUT/timeline_$mode.txt"
done
