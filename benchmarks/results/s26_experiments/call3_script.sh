#!/usr/bin/env bash
# Session 26, call 3: call 2's h_bf16 GEMM2 held 225 KB of shared memory (the 4 splits' gate and up tiles in each of
# its 4 stages), so one program per SM and two waves: 27 us. Now at most 2 stages (SUMS_GEMM2_MAX_STAGES), or 3 with
# one program per SM (GEMM2 unsplit). dsv3-ep8 fp8 M = 1 (fp8 shared expert) by hit count.
#   plan      the table
#   h2        layer.SHARED_FP8_H_IN_MODEL_DTYPE_MAX_M = 1 (GEMM2 makes h from GEMM1's 4 splits, 2 stages)
#   h3_g2s1   the same, shared GEMM2 unsplit at 1 program per SM, 3 stages
#   plan_noh  the plan with the h launch left out (probe patch: timing only)
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s26_experiments
git apply "$D/probe_skip_shared_h_launch_v2.patch" || exit 1
H="layer.SHARED_FP8_H_IN_MODEL_DTYPE_MAX_M=1"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab" --m 1 --seeds 0 \
  --rounds 2 --variant plan: --variant "h2:$H" \
  --variant "h3_g2s1:$H,experts.SUMS_GEMM2_MAX_STAGES=3,expert_configs.TABLE_PATH='$D/table_shared_m1_gemm2_split1.json'" \
  --variant "plan_noh:shared_expert.SKIP_H_PROBE=True" --profile-hits 0 > "$OUT/ab.log" 2>&1
echo "ab rc=$?"
git apply -R "$D/probe_skip_shared_h_launch_v2.patch"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab/by_hits.json" | tail -6
grep -A14 "one call's kernels" "$OUT/ab.log" | grep -v "^--" | head -80
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout -k 5 80 python -m pytest -q tests/test_expert_kernels.py -k "h_in_model_dtype" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/tests.log"
