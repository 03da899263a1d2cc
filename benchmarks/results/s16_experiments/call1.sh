#!/usr/bin/env bash
# Session 16, call 1, from the repository root with .scratch carried, on main + group_best_two.patch applied
# (s15_experiments; .scratch/topk_kernel_before_best_two.py = topk_kernel.py without it). Most needed first:
#  1. the preamble's GPU tests and CI's randomized preamble cases, fence off + best two (issue 4);
#  2. gpu_route_align_phases.py (dsv3, 4 warps, sort) with and without the best-two patch (issue 4);
#  3. the bench's preamble part, dsv3 + mixtral, M = 1..64 (issue 4);
#  4. the bench's layer part, dsv3-ep8 fp8, fp8 shared expert, M = 1, 4, two processes (issue 6);
#  5. the preamble's graph timeline, dsv3 bf16, M = 1, 4, 16, 64 (issue 4).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 100 python -m pytest -q -p no:cacheprovider -n 8 tests/test_preamble_kernels.py tests/test_preamble_fused.py \
  tests/test_random_preamble.py >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 3 "$OUT/preamble_tests.log"
cp moe_fusion/lowering/topk_kernel.py "$W/topk_now.py"
for code in now before now; do
  cp "$( [ $code = now ] && echo "$W/topk_now.py" || echo .scratch/topk_kernel_before_best_two.py )" moe_fusion/lowering/topk_kernel.py
  echo "== $code" >>"$OUT/route_phases.txt"
  timeout -k 5 35 python benchmarks/gpu_route_align_phases.py --warps 4 --sort-picks 1 >>"$OUT/route_phases.txt" 2>&1
done
cp "$W/topk_now.py" moe_fusion/lowering/topk_kernel.py
grep -E "^==|sort|Error" "$OUT/route_phases.txt" | head -n 30
timeout -k 5 70 python -m moe_fusion.tools.bench --shape dsv3,mixtral --parts preamble \
  --m 1,2,4,8,16,32,64 --variants moe_fusion --json "$W/preamble_bench.json" --markdown "$OUT/preamble_bench.md" \
  >"$W/preamble_bench.log" 2>&1
echo "preamble bench: exit $?"; grep "^| " "$OUT/preamble_bench.md" | tail -n 14
for run in 1 2; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 60 python -m moe_fusion.tools.bench --shape dsv3-ep8 --dtype fp8 --parts layer \
    --m 1,4 --variants moe_fusion --json "$W/layer_$run.json" --markdown "$W/layer_$run.md" >"$W/layer_$run.log" 2>&1
  echo "layer bench run $run: exit $?"; grep "^| dsv3" "$W/layer_$run.md"
done
timeout -k 5 90 python benchmarks/gpu_layer_timeline.py --part preamble --shape dsv3 --dtype bf16 --m 1,4,16,64 \
  >"$OUT/preamble_timeline.txt" 2>&1
echo "timeline: exit $?"
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
