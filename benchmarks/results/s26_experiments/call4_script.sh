#!/usr/bin/env bash
# Session 26, call 4: is the bf16-h GEMM2 slow for its sums or for widening fp8 weights? The same GEMM2 after an
# unsplit shared GEMM1 (h read as GEMM1 wrote it, no sums), dsv3-ep8 fp8 M = 1, one round, one call's kernels.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s26_experiments
MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab" --m 1 --seeds 0 \
  --rounds 1 --variant "s1:expert_configs.TABLE_PATH='$D/table_shared_m1_gemm1_split1_bk256.json'" \
  --variant "s1_h:layer.SHARED_FP8_H_IN_MODEL_DTYPE_MAX_M=1,expert_configs.TABLE_PATH='$D/table_shared_m1_gemm1_split1_bk256.json'" \
  --profile-hits 0 > "$OUT/ab.log" 2>&1
echo "ab rc=$?"
grep -A11 "one call's kernels" "$OUT/ab.log" | grep -v "^--" | head -30
