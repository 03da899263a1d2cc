#!/usr/bin/env bash
# Session 14, call 3 (H100), from the repository root: issue 4's GPU evidence on the final preamble code.
#  1. the preamble's GPU tests at the real shapes (kernels, the fused preamble, the route_align phase probe)
#     and the randomized preamble tests on CUDA (MOE_FUSION_RANDOM_SCALE=5);
#  2. the bench's preamble part for every shape, eager and Inductor of the reference beside moe_fusion,
#     kernels per call (run_gpu.sh, no GPU tests, no fp8 pass).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 150 python -m pytest -q -p no:cacheprovider tests/test_preamble_kernels.py tests/test_preamble_fused.py \
  tests/test_gpu_route_align_phases.py >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 2 "$OUT/preamble_tests.log"
MOE_FUSION_RANDOM_SCALE=5 timeout -k 5 100 python -m pytest -q -p no:cacheprovider tests/test_random_preamble.py \
  >"$OUT/random_preamble_tests.log" 2>&1
echo "random preamble tests: exit $?"; tail -n 2 "$OUT/random_preamble_tests.log"
RUN_GPU_TESTS=0 BENCH_PARTS=preamble BENCH_FP8_SHAPES= RUN_BUDGET_S=300 OUT=$W bash benchmarks/run_gpu.sh 2>&1 | tail -n 40
cp "$W"/*.md "$OUT/" 2>/dev/null
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
