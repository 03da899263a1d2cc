#!/usr/bin/env bash
# Session 27, call 3 (another H100 than call 2's, if one comes), dsv3-ep8 fp8 (fp8 shared expert) by hit count:
#   plan      the code now (the shared launch computes its dense alignment)
#   read      shared_expert.COMPUTED_ALIGNMENT = False, as before this session
#   sh_early  the plan with the shared launch's GEMM2 placed early at M = 1 too (probe patch; call 2: -0.2 us)
# at M = 1 (seeds 0-2, 2 rounds) and M = 4 (plan and read, seeds 0-1); then the layer's GPU tests of the shared
# expert on its own launch with GEMM2 placed early from M = 1.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s27_experiments
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
git apply "$D/probe_shared_gemm2_early_from_m.patch" || exit 1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab1" --m 1 --seeds 0,1,2 \
  --rounds 2 --variant plan: --variant "read:shared_expert.COMPUTED_ALIGNMENT=False" \
  --variant "sh_early:experts.SHARED_GEMM2_EARLY_FROM_M=1" --profile-hits 0 > "$OUT/ab1.log" 2>&1
echo "ab1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab1/by_hits.json" --routers 1000 | tail -4
MOE_FUSION_SHARED_FP8=1 timeout -k 5 60 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab4" --m 4 --seeds 0,1 \
  --rounds 2 --variant plan: --variant "read:shared_expert.COMPUTED_ALIGNMENT=False" > "$OUT/ab4.log" 2>&1
echo "ab4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab4/by_hits.json" --routers 1000 | tail -3
sed -i 's/^SHARED_GEMM2_EARLY_FROM_M = GEMM2_EARLY_FROM_M.*/SHARED_GEMM2_EARLY_FROM_M = 1/' moe_fusion/lowering/experts.py
grep -n "^SHARED_GEMM2_EARLY_FROM_M" moe_fusion/lowering/experts.py
LEFT=$(( 185 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 20 ]; then
  timeout -k 5 "$LEFT" python -m pytest -q -n 3 tests/test_layer.py tests/test_shared_expert.py -m gpu \
    -k "side_stream or (layer_on_gpu and (stream-fp8 or stream-kernels or stream-late))" -p no:warnings \
    > "$OUT/tests.log" 2>&1
  echo "tests rc=$? at $(( $(date +%s) - START )) s"; tail -4 "$OUT/tests.log"
fi
git checkout moe_fusion/lowering/experts.py
grep -A12 "one call's kernels" "$OUT/ab1.log" | head -45
