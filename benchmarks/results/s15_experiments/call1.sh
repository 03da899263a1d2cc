#!/usr/bin/env bash
# Session 15, call 1 (H100), from the repository root, with .scratch carried:
#  1. the randomized routing tests with sort_fits' fence lifted (.scratch/unfenced_sort.py) on the
#     new slot rule of _picks_by_sort (larger < TOP_K, no `last` reduction): CI's cases, and the
#     two cases that failed in session 14 at MOE_FUSION_RANDOM_SCALE=5;
#  2. the preamble's GPU tests at the real shapes (fence in place);
#  3. the randomized preamble tests at MOE_FUSION_RANDOM_SCALE=5 (fence in place);
#  4. gpu_overlap.py, dsv3-ep8 fp8, fp8 shared expert, M = 1, 4 (issue 6), before any shared-expert change;
#  5. .scratch/early_fork_probe.py: the same with the shared expert forked before the norm on fp8 groups made
#     beforehand (the bound for a shared expert that normalises x itself).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
PT="python -m pytest -q -p no:cacheprovider -n 8"
{ PYTHONPATH=$PWD:$PWD/.scratch MOE_FUSION_RANDOM_SCALE=5 timeout -k 5 45 $PT -p unfenced_sort \
    "tests/test_random_preamble.py::test_random_routing_kernel[121]" "tests/test_random_preamble.py::test_random_routing_kernel[239]"
  PYTHONPATH=$PWD:$PWD/.scratch timeout -k 5 80 $PT -p unfenced_sort tests/test_random_preamble.py -k routing_kernel; } \
  >"$OUT/unfenced_routing_tests.log" 2>&1
echo "unfenced routing tests: exit $?"; grep -E "passed|failed" "$OUT/unfenced_routing_tests.log"
timeout -k 5 130 $PT tests/test_preamble_kernels.py tests/test_preamble_fused.py tests/test_gpu_route_align_phases.py \
  >"$OUT/preamble_tests.log" 2>&1
echo "preamble tests: exit $?"; tail -n 2 "$OUT/preamble_tests.log"
MOE_FUSION_RANDOM_SCALE=5 timeout -k 5 130 $PT tests/test_random_preamble.py >"$OUT/random_preamble_tests.log" 2>&1
echo "random preamble tests: exit $?"; tail -n 2 "$OUT/random_preamble_tests.log"
timeout -k 5 85 python benchmarks/gpu_overlap.py --out "$W" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 2>&1 | tail -n 12
cp "$W"/overlap.md "$OUT"/overlap.md 2>/dev/null
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
timeout -k 5 80 python .scratch/early_fork_probe.py 2>&1 | tee "$OUT/early_fork_probe.txt"
