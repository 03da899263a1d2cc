#!/usr/bin/env bash
# Session 35, call 1 (H100): the decode-step probe (probe_e2e_step.py), then the GPU tests call 0's suite run did
# not reach in its 560 s (it passed the first 70: test_bench .. test_layer's 42nd).
set -u
OUT=${OUT:-benchmarks/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${PROBE_S:-200} python benchmarks/results/s35_experiments/probe_e2e_step.py \
  --out "$OUT" > "$OUT/probe_e2e_step.log" 2>&1; echo "probe exit $?"
grep '^{' "$OUT/probe_e2e_step.log" | cut -c1-400
PYTHONPATH=$PWD timeout -k 5 ${TESTS_S:-250} python -m pytest -q -m gpu -p no:cacheprovider --durations=10 \
  tests/test_preamble_fused.py tests/test_shared_expert.py tests/test_pass_hf.py tests/test_layer.py \
  -k "not test_layer.py or True-dsv3-ep8 or deterministic or constants_first or reduce_overhead_compile" \
  > "$OUT/gpu_rest.log" 2>&1; echo "tests exit $?"
tail -n 25 "$OUT/gpu_rest.log"
