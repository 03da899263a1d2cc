#!/usr/bin/env bash
# Session 26, call 2: the fp8 shared expert's GEMM2 making h from the split GEMM1's sums (no launch between the
# GEMMs; a bf16 x fp8 down projection) at dsv3-ep8 fp8 M = 1 (fp8 shared expert), by hit count, seeds 0 and 1:
#   plan      the table (shared GEMM1 split 4, gemm1_combine_kernel makes fp8 h)
#   h_bf16    layer.SHARED_FP8_H_IN_MODEL_DTYPE_MAX_M = 1
#   plan_noh  the plan with the h launch left out (probe patch: GEMM2 reads a stale h; timing only): the bound
# first the new path's correctness on the GPU: check_h_in_gemm2.py (dsv3 sizes, bf16) and its kernel test.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s26_experiments
timeout -k 5 120 python $D/check_h_in_gemm2.py > "$OUT/check.log" 2>&1
echo "check rc=$?"; cat "$OUT/check.log" | tail -8
timeout -k 5 100 python -m pytest -q tests/test_expert_kernels.py -k "h_in_model_dtype" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/tests.log"
git apply "$D/probe_skip_shared_h_launch_v2.patch" || exit 1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 330 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab" --m 1 --seeds 0,1 \
  --rounds 2 --variant plan: --variant "h_bf16:layer.SHARED_FP8_H_IN_MODEL_DTYPE_MAX_M=1" \
  --variant "plan_noh:shared_expert.SKIP_H_PROBE=True" --profile-hits 0,1 > "$OUT/ab.log" 2>&1
echo "ab rc=$?"
git apply -R "$D/probe_skip_shared_h_launch_v2.patch"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab/by_hits.json" | tail -5
grep -A14 "one call's kernels" "$OUT/ab.log" | head -100
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
