#!/usr/bin/env bash
# Session 20, call 4: how much do timings of the same code differ from one graph capture to the next? Call 3's
# variants that left a point's tiles as they were read up to 5 µs apart there. The plan and the shared expert
# inline (no side stream), 6 captures each, alternated, by hit count, seed 0.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
timeout -k 5 400 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0 --rounds 6 \
  --variant plan: --variant inline:layer.options.shared_expert=inline 2>&1 | grep -v -i warn
