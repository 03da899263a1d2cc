#!/usr/bin/env bash
# Session 21, call 3: call 2 read GEMM2 placed while the combine runs, without pulling weights into L2
# (EXPERT_PDL=h+gemm2, PREFETCH_BYTES=0), 0.2 / 0.8 us faster than the plan at dsv3-ep8 M = 1 / 4 (one machine, 6
# timings per count); session 20 had it with 64 KB of prefetch 1.4 / 0.5 us slower. Again on another machine, with
# dsv3 (no expert parallelism, every M hits its 8+ experts) as the guard for a default that all shapes would take;
# first the PDL modes' GPU test.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 90 python -m pytest -q tests/test_expert_kernels.py -k programmatic 2>&1 | tail -2
VARIANTS=(--variant plan: --variant h2g0:experts.EXPERT_PDL=h+gemm2,experts.PREFETCH_BYTES=0)
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ep8" --m 1,4 --seeds 0,1 \
  --rounds 4 "${VARIANTS[@]}" > "$OUT/log_ep8.txt" 2>&1
tail -1 "$OUT/log_ep8.txt"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/dsv3" --shape dsv3 --m 1,4 \
  --seeds 0 --rounds 4 "${VARIANTS[@]}" > "$OUT/log_dsv3.txt" 2>&1
tail -1 "$OUT/log_dsv3.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
