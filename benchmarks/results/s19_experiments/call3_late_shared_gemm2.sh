#!/usr/bin/env bash
# Session 19, call 3: the side stream's shared GEMM2 forked after the routed GEMM1 (so it runs beside the
# routed combine and GEMM2 instead of beside the routed GEMM1), dsv3-ep8 fp8, in one process over 32
# routers; the fp8 and the bf16 shared expert. Then the layer's timeline with it at M = 1 / 4.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
ST=layer.options.shared_expert=stream
LATE=layer.options.shared_gemm2_late=True
timeout -k 5 300 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,2,4,8 --rounds 3 --router-seeds 32 \
  --variant stream-fp8:$ST,layer.options.shared_fp8=True \
  --variant late-fp8:$ST,layer.options.shared_fp8=True,$LATE \
  --variant stream-bf16:$ST,layer.options.shared_fp8=False \
  --variant late-bf16:$ST,layer.options.shared_fp8=False,$LATE \
  2>&1 | tee "$OUT/late_ab.txt" | tail -n 6
MOE_FUSION_SHARED_GEMM2_LATE=1 MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_timeline.py --m 1,4 \
  --out "$OUT" > "$OUT/late_timeline.txt" 2>&1
tail -n 30 "$OUT/late_timeline.txt"
