#!/usr/bin/env bash
# Session 18, call 6: the dsv3-ep8 fp8 layer (fp8 shared expert) at M = 1, 4 for router seeds 4-9, 32 input sets each.
# The time is linear in the local experts the routing hits, and the router seed sets that count (sd 0.38 expert at
# M = 1 across seeds): with seeds 0-3 (calls 4-5) these give the time at the expected routing.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for seed in 4 5 6 7 8 9; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,4 \
    --dtype fp8 --variants moe_fusion --sets 32 --seed $seed --json "$OUT/seed$seed.json" --markdown /tmp/s$seed.md > /dev/null 2>&1
  echo "seed $seed"; grep "^| dsv3" /tmp/s$seed.md
done | tee "$OUT/router_seeds.txt"
