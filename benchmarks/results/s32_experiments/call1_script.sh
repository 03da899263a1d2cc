#!/usr/bin/env bash
# Session 31, prepared for the next session (one call; run call 7's parts here too). The fp8 shared expert's excess over
# 1.1 is at M = 1 nearly all its wait for the norm kernel (session31.md part 2). MOE_FUSION_SHARED_OWN_INPUT=1 (new,
# off): its GEMM1 makes its own fp8 input from x (norm_quant_rows, the norm kernel's arithmetic: the same bits, CPU-
# tested), so it is queued once the norm is but waits for nothing. In order:
#   1. its GPU tests (bits equal to the norm kernel's path, eager and under a CUDA graph);
#   2. gpu_overlap with the new "pre+shared own input" and "unblocked late" variants, the first profiled;
#   3. M = 4 with the top-k and alignment kernels not launched as programmatic dependents (call 7's second part);
#   4. by hit count, the plan against own input (layer.options.shared_own_input), M = 1 and 4.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
timeout -k 5 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_shared_expert.py \
  "tests/test_layer.py::test_the_fp8_shared_expert_making_its_own_input_gives_the_same_bits" > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - START )) s"
tail -3 "$OUT/tests.log"
timeout -k 5 100 python benchmarks/gpu_overlap.py --out "$OUT/own" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 \
  --profile "pre+shared own input" > "$OUT/own.log" 2>&1
echo "own rc=$? at $(( $(date +%s) - START )) s"
grep "^| fp8" "$OUT/own.log"
sed -n '/graph replay/,$p' "$OUT/own/overlap.md" | grep "^|\|busy"
timeout -k 5 100 python -c "import moe_fusion.lowering.topk_kernel as t, moe_fusion.lowering.align_kernel as a
select, align = t.select_experts, a.align_pairs
t.select_experts = lambda *args, pdl=False, **kw: select(*args, pdl=False, **kw)
a.align_pairs = lambda *args, pdl=False, **kw: align(*args, pdl=False, **kw)
import runpy, sys
sys.argv = ['gpu_overlap.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_overlap.py', run_name='__main__')" --out "$OUT/routing_not_pdl" --m 4 --dtypes fp8 \
  --shared-on kernels-fp8 > "$OUT/routing_not_pdl.log" 2>&1
echo "routing_not_pdl rc=$? at $(( $(date +%s) - START )) s"
grep "^| fp8" "$OUT/routing_not_pdl.log"
for m in 1 4; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m$m" --m $m --seeds 0,1 \
    --rounds 2 --variant plan: --variant own:layer.options.shared_own_input=True > "$OUT/m$m.log" 2>&1
  echo "m$m rc=$? at $(( $(date +%s) - START )) s"
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m$m/by_hits.json" | grep "^| dsv3"
done
