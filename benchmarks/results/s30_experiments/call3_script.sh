#!/usr/bin/env bash
# Session 30, call 3: launch_gap.py (see its docstring), then the issue-6 by-hits figures (M = 1 and 4, seeds 0-1,
# 3 rounds, the plan, fp8 shared expert) with timing.replayed_call_us starting every batch behind one untimed replay.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
timeout -k 5 120 python benchmarks/results/s30_experiments/launch_gap.py > "$OUT/launch_gap.log" 2>&1
echo "launch_gap rc=$? at $(( $(date +%s) - START )) s"; grep "^h=" "$OUT/launch_gap.log"
for m in 1 4; do
  timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m$m" --m $m --seeds 0,1 --rounds 3 \
    > "$OUT/m$m.log" 2>&1
  echo "m$m rc=$? at $(( $(date +%s) - START )) s"
  grep "us seed" "$OUT/m$m.log" | awk '{print $7, $8}' | paste -sd' '
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m$m/by_hits.json"
done
