#!/usr/bin/env bash
# Session 29, call 6: the layer output in more programs, again of the dsv3-ep8 fp8 layer (fp8 shared
# expert) by hit count, alternated with the plan (call 5: out512 0.4 / 0.5 us faster at M = 1 / 4, within the spread):
# out512 and out1024 (layer_output_kernel.BLOCK: the output's 7168 columns at M = 1 in 14 / 7 programs instead of 4).
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
V=(--variant plan: --variant out512:layer_output_kernel.BLOCK=512 --variant out1024:layer_output_kernel.BLOCK=1024)
for m in 1 4; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m$m" --m $m --seeds 0,1 \
    --rounds 3 "${V[@]}" > "$OUT/m$m.log" 2>&1
  echo "m$m rc=$? at $(( $(date +%s) - START )) s"
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m$m/by_hits.json"
done
