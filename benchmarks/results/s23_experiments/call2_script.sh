#!/usr/bin/env bash
# Session 23, call 2. Call 1: auto (GEMM2 placed early from M = 2) beat h by ~1 us at dsv3-ep8 M = 2, 8, 16 and
# dsv3 fp8 M = 2-64, tied on bf16, but lost 10 us at dsv3-ep8 M = 64 (297.1 against 286.8). Which launch loses it,
# and from which M? With shared_gemm2_early_own_threshold.patch applied: the routed and the shared expert's GEMM2
# placed early on thresholds of their own, at dsv3-ep8 M = 24-64 and dsv3 fp8 M = 32, 48. Then M = 1 by hits on
# two new seeds, auto against GEMM2 placed early in the shared expert's launch only (-0.4 us in call 1).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
git apply benchmarks/results/s22_experiments/shared_gemm2_early_own_threshold.patch
NEVER=100000
VARIANTS=(--variant auto: --variant h:experts.EXPERT_PDL=h
  --variant routed-early:experts.SHARED_GEMM2_EARLY_FROM_M=$NEVER
  --variant shared-early:experts.GEMM2_EARLY_FROM_M=$NEVER,experts.SHARED_GEMM2_EARLY_FROM_M=2)
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 \
  --m 24,32,48,64 --rounds 3 "${VARIANTS[@]}" > "$OUT/ab_ep8_fp8.txt" 2>&1
tail -6 "$OUT/ab_ep8_fp8.txt"
timeout -k 5 100 python benchmarks/gpu_layer_ab.py --shape dsv3 --dtype fp8 --m 32,48 --rounds 3 \
  --variant auto: --variant h:experts.EXPERT_PDL=h > "$OUT/ab_dsv3_fp8.txt" 2>&1
tail -3 "$OUT/ab_dsv3_fp8.txt"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8_m1" --m 1 --seeds 2,3 \
  --rounds 3 --variant auto: --variant shared-early:experts.SHARED_GEMM2_EARLY_FROM_M=1 > "$OUT/log_ep8_m1.txt" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ep8_m1/by_hits.json" | tail -2
git apply -R benchmarks/results/s22_experiments/shared_gemm2_early_own_threshold.patch
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
