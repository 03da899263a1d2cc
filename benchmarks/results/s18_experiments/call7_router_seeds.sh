#!/usr/bin/env bash
# Session 18, call 7: as call 6 (call6_router_seeds.sh) for seeds 0-3 and 10-13, with JSON for routing_seeds.py.
# Calls 4-5 ran seeds 0-3 with markdown only (and 64 sets for seeds 2-3); this gives 14 seeds of 32 sets, all as JSON.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for seed in 0 1 2 3 10 11 12 13; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,4 \
    --dtype fp8 --variants moe_fusion --sets 32 --seed $seed --json "$OUT/seed$seed.json" --markdown /tmp/s$seed.md > /dev/null 2>&1
  echo "seed $seed"; grep "^| dsv3" /tmp/s$seed.md
done | tee "$OUT/router_seeds.txt"
