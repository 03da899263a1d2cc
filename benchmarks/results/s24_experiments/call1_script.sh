#!/usr/bin/env bash
# Session 24, call 1: the shared expert pipelined in two parts of its width on two side streams
# (layer.PIPELINE_SHARED_MAX_M / PIPELINE_FIRST_GROUPS), dsv3-ep8 fp8 with the fp8 shared expert, M = 1.
#  1. its GPU tests (eager and CUDA-graph replays against the reference), 3 workers;
#  2. by hit count: the plan against the first part 1024 wide (pipe8) and 1536 wide (pipe12);
#  3. one call's kernels at 0 and 1 hits for each (the first round).
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > "$OUT/gpu.txt"
timeout -k 5 170 python -m pytest -q -m gpu -n 3 tests/test_layer.py tests/test_shared_expert.py \
  -k "pipelined or side_stream" --tb=short > "$OUT/tests.log" 2>&1
tail -4 "$OUT/tests.log"
PIPE=layer.PIPELINE_SHARED_MAX_M=1,layer.PIPELINE_FIRST_GROUPS
MOE_FUSION_SHARED_FP8=1 timeout -k 5 300 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 --profile-hits 0,1 --variant plan: --variant "pipe8:$PIPE=8" --variant "pipe12:$PIPE=12" \
  > "$OUT/m1.log" 2>&1
grep -n "Error\|error" "$OUT/m1.log" | head -5
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json" | tail -6
