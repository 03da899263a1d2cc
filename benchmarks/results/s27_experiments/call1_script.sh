#!/usr/bin/env bash
# Session 27, call 1: the fp8 shared expert's launch computing its dense alignment (expert_tiles.work_tile,
# DENSE_ALIGNMENT) instead of reading num_tiles, then tile_expert and pair ids, before the first weight request.
# dsv3-ep8 fp8 (fp8 shared expert), by hit count:
#   plan   the code now (shared_expert.COMPUTED_ALIGNMENT = True)
#   read   the launch reads the alignment, as before this session
# then the GPU tests of the shared expert and the layer.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
MOE_FUSION_SHARED_FP8=1 timeout -k 5 250 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab1" --m 1 --seeds 0,1 \
  --rounds 2 --variant plan: --variant "read:shared_expert.COMPUTED_ALIGNMENT=False" --profile-hits 0,1 \
  > "$OUT/ab1.log" 2>&1
echo "ab1 rc=$?"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab1/by_hits.json" --routers 1000 | tail -3
grep -A12 "one call's kernels" "$OUT/ab1.log" | head -60
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab4" --m 4 --seeds 0 \
  --rounds 2 --variant plan: --variant "read:shared_expert.COMPUTED_ALIGNMENT=False" > "$OUT/ab4.log" 2>&1
echo "ab4 rc=$?"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab4/by_hits.json" --routers 1000 | tail -3
timeout -k 5 170 python -m pytest -q -n 3 tests/test_shared_expert.py tests/test_layer.py -m "gpu or not gpu" \
  -p no:warnings > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -5 "$OUT/tests.log"
