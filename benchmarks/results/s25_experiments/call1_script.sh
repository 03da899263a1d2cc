#!/usr/bin/env bash
# Session 25, call 1: the fp8 shared expert as one launch of one_wave_mlp_kernel (W_down streamed into shared
# memory beside GEMM1's weights, the groups meeting at counters) against the plan, dsv3-ep8 fp8 layer (fp8 shared
# expert) by hit count at M = 1 and 4 with one call's kernels at 0 and 1 hits; then the GPU tests of the new path.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MOE_FUSION_SHARED_FP8=1 timeout -k 5 260 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab" --m 1,4 --seeds 0 \
  --rounds 2 --variant plan: --variant "one_wave:layer.ONE_WAVE_SHARED_MAX_M=4" --profile-hits 0,1 \
  > "$OUT/ab.log" 2>&1
echo "ab rc=$?"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab/by_hits.json" | tail -4
grep -A14 "one call's kernels" "$OUT/ab.log" | head -80
timeout -k 5 250 python -m pytest -q -n 3 tests/test_shared_expert.py tests/test_layer.py \
  -k "one_wave or one-wave or output_kernel" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"
tail -5 "$OUT/tests.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
