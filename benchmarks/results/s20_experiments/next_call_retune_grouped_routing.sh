#!/usr/bin/env bash
# Written in session 20, not run (no device time was left). The tuner now routes as DeepSeek does (grouped top-k,
# a correction bias shared by a routing's tokens: tune_experts.random_routing), so its dsv3-ep8 routings hit the
# rank's experts as the bench's do (M = 1: half hit none, a quarter two; uniform picks, which tuned the table, hit
# one most often). Retune dsv3-ep8 fp8 at M = 1 and 4 with 32 routings, then A/B the table against the retuned one
# by hit count (gpu_layer_by_hits.py, fp8 shared expert, seeds 0 and 1, 3 rounds). About 5 minutes on the H100.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cp moe_fusion/lowering/expert_configs.json /tmp/grouped.json
timeout -k 5 170 python -m moe_fusion.lowering.tune_experts --shapes dsv3-ep8 --dtypes fp8 --m 1,4 --sets 32 \
  --out /tmp/grouped.json > "$OUT/tune.txt" 2>&1
grep -- "->" "$OUT/tune.txt"; cp /tmp/grouped.json "$OUT/tuned.json"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 250 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0,1 \
  --rounds 3 --variant plan: --variant grouped:expert_configs.TABLE_PATH=/tmp/grouped.json > "$OUT/log.txt" 2>&1
tail -1 "$OUT/log.txt"
