#!/usr/bin/env bash
# Session 27, call 1: dsv3-ep8 fp8 (fp8 shared expert), by hit count, three variants alternated:
#   plan   the code now: the shared expert's launch computes its dense alignment (shared_expert.COMPUTED_ALIGNMENT),
#          and every GEMM program reads its first tile's alignment beside the tile count (experts.PRELOAD_FIRST_TILE)
#   read   the shared expert's launch reads its alignment, as before this session
#   nopre  no GEMM reads its first tile's alignment early, as before this session
# then the GPU tests of the expert kernels, the shared expert and the layer with what time is left.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
VARIANTS=(--variant plan: --variant "read:shared_expert.COMPUTED_ALIGNMENT=False"
          --variant "nopre:experts.PRELOAD_FIRST_TILE=False")
MOE_FUSION_SHARED_FP8=1 timeout -k 5 260 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab1" --m 1 --seeds 0,1 \
  --rounds 2 "${VARIANTS[@]}" --profile-hits 0,1 > "$OUT/ab1.log" 2>&1
echo "ab1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab1/by_hits.json" --routers 1000 | tail -4
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab4" --m 4 --seeds 0 \
  --rounds 2 "${VARIANTS[@]}" > "$OUT/ab4.log" 2>&1
echo "ab4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab4/by_hits.json" --routers 1000 | tail -4
LEFT=$(( 575 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 40 ]; then
  timeout -k 5 "$LEFT" python -m pytest -q -n 3 tests/test_shared_expert.py tests/test_expert_kernels.py \
    tests/test_layer.py -p no:warnings > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -5 "$OUT/tests.log"
fi
grep -A12 "one call's kernels" "$OUT/ab1.log" | head -80
