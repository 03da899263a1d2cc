#!/usr/bin/env bash
# Session 34, call 4 (H100): call 2's real-size decode step stopped at batch 4 under reduce-overhead ("Detected 5
# tensor(s) in the cudagraph pool not tracked as outputs"): the shared expert's dense-routing constants, cached on
# their first call at a new M, were made during a graph's warm-up, whose allocations go to the graph's pool.
# The new GPU test without the fix (expected to fail), with it, then call 2's real-size run again (its tiny fp32
# part passed in call 2). E2E_BATCH and NEW_TOKENS shorten it where device time is short.
set -u
OUT=${OUT:-benchmarks/out}
T="tests/test_layer.py -k constants_first_made_in_a_graph_warmup"
FIX=benchmarks/results/s34_experiments/graph_pool_fix_experts.patch  # experts.py's part of the fix
git apply -R $FIX || exit 1
echo "== without the fix"
PYTHONPATH=$PWD timeout 120 python -m pytest -q -p no:cacheprovider $T 2>&1 | grep -E "passed|failed|Error: Detected" | tail -3
git apply $FIX || exit 1
echo "== with it"
PYTHONPATH=$PWD timeout 120 python -m pytest -q -p no:cacheprovider $T 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
PYTHONPATH=/tmp/site:$PWD timeout -k 5 330 python benchmarks/e2e_decode.py --config real --layers 2 \
  --batch "${E2E_BATCH:-1,4,16}" --new-tokens "${NEW_TOKENS:-8}" --json "$OUT/e2e_real2_bf16.json" > "$OUT/e2e_real2_bf16.md" 2> "$OUT/e2e_real2_bf16.log"; echo "real exit $?"
cat "$OUT/e2e_real2_bf16.md"; tail -n 3 "$OUT/e2e_real2_bf16.log"
