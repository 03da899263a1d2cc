#!/usr/bin/env bash
# Session 29, call 5, on call 3-4's H100 if still held: two tail variants of the dsv3-ep8 fp8 layer (fp8 shared
# expert) by hit count, alternated with the plan: g2early1 (experts.GEMM2_EARLY_FROM_M=1: both GEMM2s placed early at
# M = 1 too; sessions 21-23 read -0.2 / -0.1 / +0.8 and -0.4 / +0.3 us) and out512 (layer_output_kernel.BLOCK=512: the
# output's 7168 columns at M = 1 in 14 programs instead of 4).
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
V=(--variant plan: --variant g2early1:experts.GEMM2_EARLY_FROM_M=1 --variant out512:layer_output_kernel.BLOCK=512)
for m in 1 4; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m$m" --m $m --seeds 0,1 \
    --rounds 2 "${V[@]}" > "$OUT/m$m.log" 2>&1
  echo "m$m rc=$? at $(( $(date +%s) - START )) s"
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m$m/by_hits.json"
done
