#!/usr/bin/env bash
# Session 20, call 5: one call's kernels (the middle call of a profiled replay of the timing's graph) of the
# dsv3-ep8 fp8 layer (fp8 shared expert, the plan) at 0, 1 and 2 local experts hit, M = 1 and 4, seed 0.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
timeout -k 5 300 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0 --profile-hits 0,1,2 \
  2>&1 | grep -v -i warn
