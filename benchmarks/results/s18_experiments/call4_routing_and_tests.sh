#!/usr/bin/env bash
# Session 18, call 4:
#  1. the dsv3-ep8 fp8 layer (fp8 shared expert) at M = 1, 4 over 32 input sets, seeds 0 and 1: the default 8 sets
#     of seed 0 hit 0.8 local experts per call at M = 1 where uniform routing expects 1.0 (8 x 32 / 256);
#  2. the GPU tests of the shared expert, the plan and the layer, 3 workers (8 ran out of memory in session 17).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for seed in 0 1; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,4 \
    --dtype fp8 --variants moe_fusion --sets 32 --seed $seed --markdown "$OUT/ep8_fp8_sets32_seed$seed.md" > "$OUT/ep8_seed$seed.log" 2>&1
  echo "sets 32 seed $seed"; grep "^| dsv3" "$OUT/ep8_fp8_sets32_seed$seed.md"
done
timeout -k 5 330 python -m pytest -q -p no:cacheprovider -n 3 -m gpu tests/test_shared_expert.py tests/test_shared_plan.py \
  tests/test_layer.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?"; tail -n 3 "$OUT/gpu_tests.log"
