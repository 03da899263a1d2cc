#!/usr/bin/env bash
# Session 15, call 4 (H100; never ran: no machine came), from the repository root, on commit 05a9b72 (the shared expert's own norm reverted; the routing
# sort on every tile, sort_fits removed; group scores' best two in one reduction). Most needed first, each result written as it ends:
#  1. the bench's layer part, dsv3-ep8 fp8 with the fp8 shared expert, M = 1, 4, two processes (issue 6);
#  2. gpu_route_align_phases.py (dsv3, 4 warps, picks by sort) on this code and on topk_kernel.py before the group
#     scores' one-pass best two (.scratch/topk_kernel_before_best_two.py, carried), one process each (issue 4);
#  3. the preamble's GPU tests and CI's randomized preamble cases (issue 4);
#  4. the bench's preamble part, moe_fusion, dsv3 and mixtral, M = 1..64 (issue 4).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for run in 1 2; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 60 python -m moe_fusion.tools.bench --shape dsv3-ep8 --dtype fp8 --parts layer \
    --m 1,4 --variants moe_fusion --json "$W/layer_$run.json" --markdown "$OUT/layer_$run.md" >"$W/layer_$run.log" 2>&1
  echo "layer bench run $run: exit $?"; grep "^| dsv3" "$OUT/layer_$run.md"
done
cp moe_fusion/lowering/topk_kernel.py "$W/topk_now.py"
for code in now before; do
  cp "$( [ $code = now ] && echo "$W/topk_now.py" || echo .scratch/topk_kernel_before_best_two.py )" moe_fusion/lowering/topk_kernel.py
  echo "== $code" >>"$OUT/route_phases.txt"
  timeout -k 5 35 python benchmarks/gpu_route_align_phases.py --warps 4 --sort-picks 1 >>"$OUT/route_phases.txt" 2>&1
done
cp "$W/topk_now.py" moe_fusion/lowering/topk_kernel.py
grep -E "^==|sort picks|Error" "$OUT/route_phases.txt" | head -n 30
timeout -k 5 80 python -m pytest -q -p no:cacheprovider -n 8 tests/test_preamble_kernels.py tests/test_preamble_fused.py \
  tests/test_random_preamble.py >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 2 "$OUT/preamble_tests.log"
timeout -k 5 50 python -m moe_fusion.tools.bench --shape dsv3,mixtral --parts preamble \
  --m 1,2,4,8,16,32,64 --variants moe_fusion --json "$W/preamble_bench.json" --markdown "$OUT/preamble_bench.md" \
  >"$W/preamble_bench.log" 2>&1
echo "preamble bench: exit $?"; grep "^| " "$OUT/preamble_bench.md" | tail -n 14
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
