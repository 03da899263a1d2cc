#!/usr/bin/env bash
# Session 21, call 2: call 1's timelines at 3 hits show the routed combine ending 2.2-3.9 us after the routed GEMM1,
# on the critical path, while the stream-late shared GEMM2 starts streaming right as GEMM1 ends. A/B by hit count
# (fp8 shared expert, seeds 0 and 1, 3 rounds alternated): the shared GEMM2 forked once the routed combine is
# queued (experts.LATE_FORK=h: it starts beside the routed GEMM2) against the plan (after the routed GEMM1); and
# GEMM2 placed while the combine runs without pulling weights into L2 (EXPERT_PDL=h+gemm2, PREFETCH_BYTES=0;
# session 20 tried it only with 64 and 128 KB of prefetch: +1.4 us at M = 1).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 300 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0,1 \
  --rounds 3 --profile-hits 2,3 --variant plan: --variant late-h:experts.LATE_FORK=h \
  --variant h2g0:experts.EXPERT_PDL=h+gemm2,experts.PREFETCH_BYTES=0 > "$OUT/log.txt" 2>&1
tail -2 "$OUT/log.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
