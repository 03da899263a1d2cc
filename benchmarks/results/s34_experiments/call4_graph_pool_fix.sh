#!/usr/bin/env bash
# Session 34, call 4 (H100): call 2's real-size decode step stopped at batch 4 under reduce-overhead ("Detected 5
# tensor(s) in the cudagraph pool not tracked as outputs"): the shared expert's dense-routing constants, cached on
# their first call at a new M, were made during a graph's warm-up, whose allocations go to the graph's pool.
# The new GPU test without the fix (expected to fail), with it, then call 2 again.
set -u
OUT=${OUT:-benchmarks/out}
T="tests/test_layer.py -k constants_first_made_in_a_graph_warmup"
FIX=benchmarks/results/s34_experiments/graph_pool_fix_experts.patch  # experts.py's part of the fix
git apply -R $FIX || exit 1
echo "== without the fix"
PYTHONPATH=$PWD timeout 150 python -m pytest -q -p no:cacheprovider $T 2>&1 | grep -E "passed|failed|Error: Detected" | tail -3
git apply $FIX || exit 1
echo "== with it"
PYTHONPATH=$PWD timeout 150 python -m pytest -q -p no:cacheprovider $T 2>&1 | tail -2
OUT=$OUT bash benchmarks/results/s34_experiments/call2_e2e.sh
