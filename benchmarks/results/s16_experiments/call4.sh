#!/usr/bin/env bash
# Session 16, call 4, from the repository root: the pair-list alignment kept only in the one-program alignment kernel,
# up to 32 pairs (route_align back to the selection). 1. the preamble's GPU tests and CI's randomized preamble
# cases; 2. in-process A/B of the preamble, selection against pair list, at the token counts it now covers.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 100 python -m pytest -q -p no:cacheprovider -n 8 tests/test_preamble_kernels.py tests/test_preamble_fused.py \
  tests/test_random_preamble.py tests/test_gpu_route_align_phases.py >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 3 "$OUT/preamble_tests.log"
for case in "dsv3 2,4" "dsv3-ep8 2,4" "qwen3-30b-a3b 2,4"; do
  set -- $case
  echo "== $1" >>"$OUT/preamble_ab.txt"
  timeout -k 5 80 python benchmarks/gpu_layer_ab.py --part preamble --shape "$1" --dtype bf16 --m "$2" --rounds 3 \
    --variant sel:align_kernel.PAIR_LIST_MAX_PAIRS=0 --variant pairs:align_kernel.PAIR_LIST_MAX_PAIRS=32 \
    >>"$OUT/preamble_ab.txt" 2>&1
  echo "A/B $1: exit $?"
done
grep -E "^==|median|sel:|pairs:" "$OUT/preamble_ab.txt" | grep -v round
