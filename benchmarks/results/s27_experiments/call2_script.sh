#!/usr/bin/env bash
# Session 27, call 2 (the first-tile preload reverted after call 1):
# 1. the GPU tests of the shared expert (the computed dense alignment) and the layer (call 1 ran the expert kernels');
# 2. dsv3-ep8 fp8 (fp8 shared expert) by hit count at M = 1, variants alternated:
#      plan      the code now (the shared launch computes its dense alignment)
#      read      shared_expert.COMPUTED_ALIGNMENT = False, as before this session
#      sh_early  the plan with the shared launch's GEMM2 placed early at M = 1 (probe patch)
#    with each profiled call's period (where the next call's first kernel starts);
# 3. the plan alone at M = 1 and 4, seeds 0-1, 3 rounds.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s27_experiments
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
timeout -k 5 200 python -m pytest -q -n 3 tests/test_shared_expert.py tests/test_layer.py \
  -p no:warnings > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - START )) s"; tail -4 "$OUT/tests.log"
git apply "$D/probe_shared_gemm2_early_from_m.patch" || exit 1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab1" --m 1 --seeds 0,1 \
  --rounds 2 --variant plan: --variant "read:shared_expert.COMPUTED_ALIGNMENT=False" \
  --variant "sh_early:experts.SHARED_GEMM2_EARLY_FROM_M=1" --profile-hits 0,1 > "$OUT/ab1.log" 2>&1
echo "ab1 rc=$? at $(( $(date +%s) - START )) s"
git apply -R "$D/probe_shared_gemm2_early_from_m.patch"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab1/by_hits.json" --routers 1000 | tail -4
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_by_hits.py --out "$OUT/plan" --m 1,4 --seeds 0,1 \
  --rounds 3 > "$OUT/plan.log" 2>&1
echo "plan rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/plan/by_hits.json" --routers 1000 | tail -3
grep -A14 "one call's kernels" "$OUT/ab1.log" | head -100
