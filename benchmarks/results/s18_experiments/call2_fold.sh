#!/usr/bin/env bash
# Ran with s18_experiments/shared_expert_folds_norm.patch applied (the "shared folded" variant, --side-stream-priority and
# MOE_FUSION_SHARED_FOLDS_NORM exist only there); the patch was dropped (session18.md part 3).
# Session 18, call 2: the shared expert folding the norm into its GEMM1 (fork before the norm).
#  1. GPU tests of the shared expert and of the layer's side-stream variants (-n 3: -n 8 ran out of memory);
#  2. overlap, fold vs after-norm in one process: bf16 shared expert (default), fp8 shared expert;
#     and once with the side stream at high priority;
#  3. the layers with the side stream: dsv3-ep8 fp8 with the fp8 shared expert, M = 1, 4, fold on / off.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 200 python -m pytest -q -p no:cacheprovider -n 3 -m gpu tests/test_shared_expert.py tests/test_layer.py \
  -k "stream or shared_expert" > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?"; tail -n 3 "$OUT/gpu_tests.log"
for args in "--dtypes bf16,fp8" "--dtypes fp8 --shared-on kernels-fp8" "--dtypes fp8 --shared-on kernels-fp8 --side-stream-priority -1"; do
  echo "== gpu_overlap $args"
  timeout -k 5 90 python benchmarks/gpu_overlap.py --out "$OUT/ov" --m 1,4 $args 2>&1 | grep "^\[overlap\]"
done
cp "$OUT/ov/overlap.md" "$OUT/overlap_last.md" 2>/dev/null
for fold in 1 0; do
  MOE_FUSION_SHARED_FP8=1 MOE_FUSION_SHARED_FOLDS_NORM=$fold timeout -k 5 120 python -m moe_fusion.tools.bench \
    --shape dsv3-ep8 --parts layer --m 1,4 --dtype fp8 --variants moe_fusion --markdown "$OUT/ep8_fold$fold.md" > /dev/null 2>&1
  echo "fold=$fold"; grep "^| dsv3" "$OUT/ep8_fold$fold.md"
done
