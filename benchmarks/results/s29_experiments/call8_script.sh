#!/usr/bin/env bash
# Prepared in session 29 for the next session's first call (no device time was left): where a slow CUDA-graph
# capture of the plan loses its time (session29.md part 5: single timings ~1.3 us apart, then ~2.4 more, with no
# setting changed). benchmarks/gpu_capture_spread.py captures the dsv3-ep8 fp8 layer (fp8 shared expert) on the same
# 32 inputs 12 times per hit count, times each graph before and after one profiled replay of it, records its pool's
# segments and streams, and prints the middle call of the fastest and of the slowest capture. Three processes at
# M = 1, one setting each, to tell the two guesses apart:
#   default
#   conn32      CUDA_DEVICE_MAX_CONNECTIONS=32 (8 by default): if the states are how the driver puts the graph's
#               two branches on hardware queues, more queues should change them
#   expandable  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: if they are where the graph's buffers lie, another
#               way of mapping the pool's memory should change them
# then M = 4 by default, and the GPU tests of the tool. Each part is cut to fit the 600 s of one call (115 s per
# process; the JSON is written after each hit count).
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
spread() {  # name, M, then environment settings
  local name=$1 m=$2
  shift 2
  env "$@" timeout -k 5 115 python benchmarks/gpu_capture_spread.py --out "$OUT/$name" --m "$m" --hits 0,1 \
    --captures 12 > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep -iv "warn" "$OUT/$name.log" | tail -60
}
spread m1_default 1
spread m1_conn32 1 CUDA_DEVICE_MAX_CONNECTIONS=32
spread m1_expandable 1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
spread m4_default 4
timeout -k 5 90 python -m pytest -q tests/test_gpu_capture_spread.py tests/test_gpu_layer_by_hits.py -p no:warnings \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - START )) s"; tail -3 "$OUT/tests.log"
