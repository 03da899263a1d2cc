#!/usr/bin/env bash
# Written in session 22, not run (no device time was left). EXPERT_PDL=auto places GEMM2 early from M = 2; it was
# measured at M = 1 and 4 only. Part 1 times auto against h at the other decode M: dsv3-ep8 fp8 (fp8 shared expert)
# at M = 2 by hit count, and the whole layer in-process (gpu_layer_ab.py; by-hits would time dozens of hit counts
# there) for dsv3 fp8 and bf16 at M = 2-64 (the floor target holds at every M) and dsv3-ep8 fp8 at M = 8-64. If h wins
# somewhere, raise experts.GEMM2_EARLY_FROM_M or bound it above. Part 2, with shared_gemm2_early_own_threshold.patch
# applied: M = 1 with GEMM2 placed early in the shared expert's launch only (at 0 hits only that launch has work,
# and h+gemm2 was faster there in two of three calls; with hits the routed GEMM2's early programs may hold SM slots
# the shared GEMM2 would stream in). About 8 minutes on the H100.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
VARIANTS=(--variant auto: --variant h:experts.EXPERT_PDL=h)
MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8_m2" --m 2 --seeds 0 \
  --rounds 3 "${VARIANTS[@]}" > "$OUT/log_ep8_m2.txt" 2>&1
tail -1 "$OUT/log_ep8_m2.txt"
for dtype in fp8 bf16; do
  timeout -k 5 90 python benchmarks/gpu_layer_ab.py --shape dsv3 --dtype $dtype --m 2,8,16,64 --rounds 3 "${VARIANTS[@]}" \
    > "$OUT/ab_dsv3_$dtype.txt" 2>&1
  tail -5 "$OUT/ab_dsv3_$dtype.txt"
done
MOE_FUSION_SHARED_FP8=1 timeout -k 5 90 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 8,16,64 \
  --rounds 3 "${VARIANTS[@]}" > "$OUT/ab_ep8_fp8.txt" 2>&1
tail -4 "$OUT/ab_ep8_fp8.txt"
git apply benchmarks/results/s22_experiments/shared_gemm2_early_own_threshold.patch
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8_m1" --m 1 --seeds 0,1 \
  --rounds 3 --variant auto: --variant shared-early:experts.SHARED_GEMM2_EARLY_FROM_M=1 \
  --variant h+gemm2:experts.EXPERT_PDL=h+gemm2 > "$OUT/log_ep8_m1.txt" 2>&1
tail -1 "$OUT/log_ep8_m1.txt"
git apply -R benchmarks/results/s22_experiments/shared_gemm2_early_own_threshold.patch
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
