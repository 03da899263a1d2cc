#!/usr/bin/env bash
# Session 15, call 5: never ran (no device time was left to start a machine). For the next session, on any Hopper
# card: first `git apply benchmarks/results/s15_experiments/group_best_two.patch` (group scores' best two in one
# tuple reduction, measured on the CPU only: bitwise the same results, 2034 instead of 2248 PTX lines for the dsv3
# routing kernel) and `git show HEAD:moe_fusion/lowering/topk_kernel.py > .scratch/topk_kernel_before_best_two.py`;
# then, from the repository root with .scratch carried:
#  1. the preamble's GPU tests and CI's randomized preamble cases (issue 4);
#  2. gpu_route_align_phases.py (dsv3, 4 warps, picks by sort) on this code and on topk_kernel.py before the group
#     scores' one-pass best two (.scratch/topk_kernel_before_best_two.py), one process each (issue 4);
#  3. the bench's preamble part, moe_fusion, dsv3, M = 1..64 (issue 4).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 80 python -m pytest -q -p no:cacheprovider -n 8 tests/test_preamble_kernels.py tests/test_preamble_fused.py \
  tests/test_random_preamble.py >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 2 "$OUT/preamble_tests.log"
cp moe_fusion/lowering/topk_kernel.py "$OUT/topk_now.py"
for code in now before; do
  cp "$( [ $code = now ] && echo "$OUT/topk_now.py" || echo .scratch/topk_kernel_before_best_two.py )" moe_fusion/lowering/topk_kernel.py
  echo "== $code" >>"$OUT/route_phases.txt"
  timeout -k 5 35 python benchmarks/gpu_route_align_phases.py --warps 4 --sort-picks 1 >>"$OUT/route_phases.txt" 2>&1
done
cp "$OUT/topk_now.py" moe_fusion/lowering/topk_kernel.py && rm "$OUT/topk_now.py"
grep -E "^==|sort picks|Error" "$OUT/route_phases.txt" | head -n 30
timeout -k 5 50 python -m moe_fusion.tools.bench --shape dsv3 --parts preamble \
  --m 1,2,4,8,16,32,64 --variants moe_fusion --markdown "$OUT/preamble_bench.md" >"$OUT/preamble_bench.log" 2>&1
echo "preamble bench: exit $?"; grep "^| " "$OUT/preamble_bench.md" | tail -n 7
