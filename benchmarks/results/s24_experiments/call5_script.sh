#!/usr/bin/env bash
# Session 24, call 5: the table now splits the routed GEMM1 4 ways at dsv3-ep8 fp8 M = 4 (call 4: 84.4 against
# 85.2 us). Again on another seed, against the old 2-way split from a copy of the table; then the layer's GPU tests
# of the dsv3-ep8 fp8 shapes, which run M = 4 with it.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
TABLE="expert_configs.TABLE_PATH='benchmarks/results/s24_experiments/table_ep8_m4_gemm1_split2.json'"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 1 \
  --rounds 3 --variant plan: --variant "g1split2:$TABLE" > "$OUT/m4.log" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json" | tail -2
timeout -k 5 200 python -m pytest -q -m gpu -n 3 tests/test_layer.py -k "dsv3-ep8-fp8 and not from-bf16" --tb=short \
  > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
