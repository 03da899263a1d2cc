#!/usr/bin/env bash
# Session 16, call 3, from the repository root: the alignment from the pair list (align_kernel.align_pair_list,
# [pairs, pairs] comparisons instead of the [tokens, experts] selection) in route_align's one tile and in the
# one-program alignment up to 64 pairs (issue 4). Most needed first:
#  1. the preamble's GPU tests and CI's randomized preamble cases (correctness of the new path on the GPU);
#  2. gpu_route_align_phases.py, dsv3 M = 1, selection against pair list;
#  3. in-process A/B of the preamble (router weights from HBM), selection against pair list: dsv3 M = 1, 2, 4, 8,
#     dsv3-ep8 M = 1, 4 (expert map), qwen3 and mixtral M = 1, 4, 8;
#  4. the bench's preamble part, every shape, moe_fusion, M = 1..64.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 100 python -m pytest -q -p no:cacheprovider -n 8 tests/test_preamble_kernels.py tests/test_preamble_fused.py \
  tests/test_random_preamble.py tests/test_gpu_route_align_phases.py >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 3 "$OUT/preamble_tests.log"
timeout -k 5 40 python benchmarks/gpu_route_align_phases.py --warps 4 --sort-picks 1 --pair-list 0,1,0,1 \
  >"$OUT/route_phases.txt" 2>&1
echo "route phases: exit $?"; grep -E "pair list|Error" "$OUT/route_phases.txt"
SEL=sel:route_align_kernel.PAIR_LIST=False,align_kernel.PAIR_LIST_MAX_PAIRS=0
PAIRS=pairs:route_align_kernel.PAIR_LIST=True,align_kernel.PAIR_LIST_MAX_PAIRS=64
for case in "dsv3 1,2,4,8" "dsv3-ep8 1,4" "qwen3-30b-a3b 1,4,8" "mixtral 1,4,8"; do
  set -- $case
  echo "== $1" >>"$OUT/preamble_ab.txt"
  timeout -k 5 100 python benchmarks/gpu_layer_ab.py --part preamble --shape "$1" --dtype bf16 --m "$2" --rounds 3 \
    --variant "$SEL" --variant "$PAIRS" >>"$OUT/preamble_ab.txt" 2>&1
  echo "A/B $1: exit $?"
done
grep -E "^==|median|sel:|pairs:" "$OUT/preamble_ab.txt" | grep -v round
timeout -k 5 70 python -m moe_fusion.tools.bench --shape dsv3,dsv3-ep8,qwen3-30b-a3b,mixtral --parts preamble \
  --m 1,2,4,8,16,32,64 --variants moe_fusion --json "$OUT/preamble_bench.json" --markdown "$OUT/preamble_bench.md" \
  >"$OUT/preamble_bench.log" 2>&1
echo "preamble bench: exit $?"; grep "^| " "$OUT/preamble_bench.md" | cut -c1-90
