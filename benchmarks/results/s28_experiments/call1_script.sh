#!/usr/bin/env bash
# Session 28, call 1: the routed GEMMs' pipelines shortened to fit on an SM beside the side stream's shared GEMM
# (layer.ROUTED_FITS_BESIDE_SHARED). dsv3-ep8 fp8 (fp8 shared expert) by hit count, variants alternated:
#   plan    the routed tiles fitted (M = 1: GEMM1 block_k 256 -> 128, 3 stages; GEMM2 4 -> 3 stages)
#   unfit   the tuned tiles as they are (the code before this session)
#   r2only  unfit, with only the routed GEMM2 in 3 stages (variant_tables.py r2s3)
#   sh2s3   unfit, with the shared GEMM2 in 3 stages instead
# each launch's programs, registers and shared memory in the profiled timelines; then the layer's GPU tests.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s28_experiments
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
python $D/variant_tables.py "$OUT/tables" > /dev/null || exit 1
UNFIT=layer.ROUTED_FITS_BESIDE_SHARED=False
V=(--variant plan: --variant "unfit:$UNFIT" --variant "r2only:$UNFIT,expert_configs.TABLE_PATH=$OUT/tables/r2s3.json"
   --variant "sh2s3:$UNFIT,expert_configs.TABLE_PATH=$OUT/tables/sh2s3.json")
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 "${V[@]}" --profile-hits 1,2 > "$OUT/m1.log" 2>&1
echo "m1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json" --routers 1000
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0 \
  --rounds 2 "${V[@]:0:4}" --profile-hits 1 > "$OUT/m4.log" 2>&1
echo "m4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json" --routers 1000
timeout -k 5 $(( 560 - ($(date +%s) - START) )) python -m pytest -q -n 3 tests/test_layer.py tests/test_sm_residency.py \
  -p no:warnings > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - START )) s"; tail -4 "$OUT/tests.log"
grep -A12 "one call's kernels" "$OUT/m1.log" | head -200
grep -A12 "one call's kernels" "$OUT/m4.log" | head -30
rm -rf "$OUT/tables"
