#!/usr/bin/env bash
# Written in session 18, not run (no device time was left).
#  1. The dsv3-ep8 fp8 layer's shared-expert strategy with the fp8 shared expert, at M = 1, 2, 4, A/B in one process
#     (gpu_layer_ab.py) over 32 routers, one per input set, so the sets hit about as many local experts as routing
#     should on average (session18.md part 2). shared_plan.json chose "stream" at M = 1, 2, 4 from seed-0 bench runs,
#     whose routing hits fewer local experts (0.8 / - / 2.2 against the expected 1.0 / - / 3.48). "plan" is what the
#     plan picks now.
#  2. Where the M = 1 / 4 layer spends its time, kernel by kernel (gpu_layer_timeline.py, gpu_overlap's input sets).
# About 4 minutes on the H100.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
FP8=layer.options.shared_fp8=True
timeout -k 5 300 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 --router-seeds 32 \
  --variant plan:$FP8 --variant stream:$FP8,layer.options.shared_expert=stream \
  --variant fused:$FP8,layer.options.shared_expert=fused --variant inline:$FP8,layer.options.shared_expert=inline \
  2>&1 | tee "$OUT/strategies_ab.txt"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_timeline.py --m 1,4 --out "$OUT" > "$OUT/timeline.txt" 2>&1
tail -n 40 "$OUT/timeline.txt"
