#!/usr/bin/env bash
# Written in session 22, not run (no device time was left). EXPERT_PDL=auto places GEMM2 early from M = 2; it was
# measured at M = 1 and 4 only. This times auto against h at the other decode M, by hit count, for dsv3 fp8 and bf16
# (the bench's floor target, every M) and dsv3-ep8 fp8 (fp8 shared expert). If h wins somewhere, raise
# experts.GEMM2_EARLY_FROM_M or bound it above. About 5 minutes on the H100.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
VARIANTS=(--variant auto: --variant h:experts.EXPERT_PDL=h)
MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8" --m 2,8,16 --seeds 0 \
  --rounds 3 "${VARIANTS[@]}" > "$OUT/log_ep8.txt" 2>&1
tail -1 "$OUT/log_ep8.txt"
for dtype in fp8 bf16; do
  timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/dsv3_$dtype" --shape dsv3 --dtype $dtype \
    --m 2,8,16,64 --seeds 0 --rounds 3 "${VARIANTS[@]}" > "$OUT/log_dsv3_$dtype.txt" 2>&1
  tail -1 "$OUT/log_dsv3_$dtype.txt"
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
