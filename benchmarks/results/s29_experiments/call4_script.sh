#!/usr/bin/env bash
# Session 29, call 4: the plan by hit count (dsv3-ep8 fp8, fp8 shared expert) with the GPU's clocks sampled every
# 100 ms while it runs. Call 1's H100 read 48.3 / 87.5 us at M = 1 / 4 and call 3's 44.8 / 82.7 for the same code;
# T(h) - T(0) was the same on both (~14.9 us per hit), T(0) 3 us apart: a fixed cost, as if the latency-bound steps
# ran at another SM clock. This records the clocks beside the times (every 100 ms), and the clock limits and
# throttle reasons before and after.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -q -d CLOCK,POWER,PERFORMANCE,TEMPERATURE > "$OUT/smi_before.txt" 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv,noheader -lms 100 > "$OUT/clocks.csv" 2>&1 &
SAMPLER=$!
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 --profile-hits 0 > "$OUT/m1.log" 2>&1
echo "m1 rc=$? at $(( $(date +%s) - START )) s"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 120 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m4" --m 4 --seeds 0 \
  --rounds 2 > "$OUT/m4.log" 2>&1
echo "m4 rc=$? at $(( $(date +%s) - START )) s"
kill $SAMPLER
nvidia-smi -q -d CLOCK,POWER,PERFORMANCE > "$OUT/smi_after.txt" 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m4/by_hits.json"
grep -E "Max Clocks|Applications Clocks|Default Applications|SM  |Memory  |Power Limit|Enforced" -A0 "$OUT/smi_before.txt" | head -30
python - "$OUT/clocks.csv" <<'PY'
import sys
rows = [r.split(", ") for r in open(sys.argv[1]) if r.count(",") >= 4]
busy = [r for r in rows if float(r[3].split()[0]) > 150]  # samples while the GPU draws power: the timed part
for name, i in (("sm MHz", 1), ("mem MHz", 2), ("power W", 3), ("temp C", 4)):
    vals = sorted(float(r[i].split()[0]) for r in busy)
    if vals:
        print(f"{name}: n={len(vals)} min {vals[0]:g} median {vals[len(vals)//2]:g} max {vals[-1]:g}")
PY
grep -A12 "one call's kernels" "$OUT/m1.log" | head -14
