#!/usr/bin/env bash
# Session 19, call 4: where the side stream's fp8 shared expert starts (after the norm, as shipped, or after
# the router GEMM, so the router streams its 3.7 MB alone) and where its GEMM2 starts (beside the routed
# GEMM1, as shipped, or after it: "late"), dsv3-ep8 fp8, in one process over 32 routers. Then the layer
# timeline of the best guess (router + late) at M = 1 / 4.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
ST=layer.options.shared_expert=stream,layer.options.shared_fp8=True
LATE=layer.options.shared_gemm2_late=True
ROUTER=layer.options.shared_after_router=True
timeout -k 5 300 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,2,4,8 --rounds 3 --router-seeds 32 \
  --variant norm:$ST --variant norm-late:$ST,$LATE --variant router:$ST,$ROUTER --variant router-late:$ST,$ROUTER,$LATE \
  2>&1 | tee "$OUT/fork_ab.txt" | tail -n 6
MOE_FUSION_SHARED_AFTER_ROUTER=1 MOE_FUSION_SHARED_GEMM2_LATE=1 MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 \
  python benchmarks/gpu_layer_timeline.py --m 1,4 --out "$OUT" > "$OUT/fork_timeline.txt" 2>&1
tail -n 28 "$OUT/fork_timeline.txt"
