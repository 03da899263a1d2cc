#!/usr/bin/env bash
# Session 30, call 2. Call 1 (s29's call8_script.sh) found no spread inside a process: 12 captures at M = 1 read
# within 0.3 us of each other (h=0 28.4-28.6, h=1 44.3-44.7), their pools at one address, while the processes
# differed (h=0: 28.5 default, 29.4 conn32 and expandable). So the capture alone does not pick the state; what
# by-hits does between its timings might. One process per --placement (gpu_capture_spread.PLACEMENTS):
#   same   call 1 again; pad: same pages, other offsets; keep: fresh memory for every pool;
#   eager  the calls run eagerly before each capture, as bench.time_point does.
# Then call 7 A of session 29 (the plan under three names, by-hits, seed 0) to see the states on this machine.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
for placement in same pad keep eager; do
  timeout -k 5 100 python benchmarks/gpu_capture_spread.py --out "$OUT/$placement" --m 1 --hits 0,1 --captures 12 \
    --placement "$placement" > "$OUT/$placement.log" 2>&1
  echo "$placement rc=$? at $(( $(date +%s) - START )) s"
  grep -E "^hits|^ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9]+ " "$OUT/$placement.log" | awk '{print $1, $2, $3, $4, $(NF-1), $NF}'
done
timeout -k 5 150 python benchmarks/gpu_layer_by_hits.py --out "$OUT/byhits" --m 1 --seeds 0 --rounds 3 \
  --variant plan: --variant plan2: --variant plan3: > "$OUT/byhits.log" 2>&1
echo "byhits rc=$? at $(( $(date +%s) - START )) s"
grep "us seed" "$OUT/byhits.log" | awk '{print $3, $5, $6, $7}' | paste -sd' '
