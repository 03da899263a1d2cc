#!/usr/bin/env bash
# Session 28, call 1: does the routed GEMM2 wait for SM room beside the shared GEMM2?
# dsv3-ep8 fp8 (fp8 shared expert) by hit count, variants alternated (variant_tables.py):
#   plan    the shipped tables
#   r2s3    the routed GEMM2 in fewer pipeline stages (M = 1: 3; M = 4: block_k 128, 3 stages)
#   sh2s3   the shared GEMM2 in 3 stages
#   sh2p1   the shared GEMM2 at one program per SM
#   r1k128s4  the routed GEMM1 in 128-wide K steps, 4 stages (72 KB a program: two fit beside the shared GEMM1)
#   r12     r1k128s4 and r2s3
# with each launch's programs, registers and shared memory in the profiled timelines.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s28_experiments
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
python $D/variant_tables.py "$OUT/tables" > /dev/null || exit 1
V=()
for name in r2s3 r12 sh2s3 sh2p1 r1k128s4; do V+=(--variant "$name:expert_configs.TABLE_PATH=$OUT/tables/$name.json"); done
MOE_FUSION_SHARED_FP8=1 timeout -k 5 240 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 --variant plan: "${V[@]}" --profile-hits 0,1,2 > "$OUT/m1.log" 2>&1
echo "m1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json" --routers 1000
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0 \
  --rounds 2 --variant plan: "${V[@]:0:4}" --profile-hits 1,2 > "$OUT/m4.log" 2>&1
echo "m4 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json" --routers 1000
grep -A12 "one call's kernels" "$OUT/m1.log" | head -300
grep -A12 "one call's kernels" "$OUT/m4.log" | head -120
rm -rf "$OUT/tables"
