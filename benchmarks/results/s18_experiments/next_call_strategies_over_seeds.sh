#!/usr/bin/env bash
# Written in session 18, not run (no device time was left): the dsv3-ep8 fp8 layer's shared-expert strategy, fp8 shared
# expert, at M = 1, 2, 4, measured at the routing the layer should expect instead of seed 0's (session18.md part 2).
# shared_plan.json chose "stream" at M = 1, 2, 4 from seed-0 runs, which hit fewer local experts (0.8 / - / 2.2 against
# the expected 1.0 / - / 3.48). Six seeds per strategy; routing_seeds.py reads each strategy's line at the expected hits.
# About 6 minutes on the H100; only the summaries come back (the JSONs stay on the device: $OUT keeps 8 files).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for strategy in stream fused inline; do
  mkdir -p "/tmp/$strategy"
  for seed in 0 1 2 3 4 5; do
    MOE_FUSION_SHARED_FP8=1 MOE_FUSION_SHARED_EXPERT=$strategy timeout -k 5 100 python -m moe_fusion.tools.bench \
      --shape dsv3-ep8 --parts layer --m 1,2,4 --dtype fp8 --variants moe_fusion --sets 32 --seed $seed \
      --json "/tmp/$strategy/seed$seed.json" > /dev/null 2>&1
  done
  echo "== $strategy"
  python benchmarks/routing_seeds.py /tmp/$strategy/seed*.json
done | tee "$OUT/strategies_over_seeds.txt"
# Then where the M = 1 / 4 layer spends its time, kernel by kernel (gpu_layer_timeline.py, on gpu_overlap's input sets).
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_timeline.py --m 1,4 --out "$OUT" > "$OUT/timeline.txt" 2>&1
tail -n 40 "$OUT/timeline.txt"
