#!/usr/bin/env bash
# Session 30, call 4. Call 3: starting each batch behind a lead replay moved the layer's time by at most 0.2 us
# (launch_gap.py), so the launch is not the states' cause; by-hits read 44.5 / 82.9 us (M = 1 / 4) in that process.
# By-hits has timed every call on the same preamble and shared-expert weights: 48 MB at dsv3-ep8 fp8, inside the
# H100's 50 MB L2, which session 17 found made the shared expert alone read 3% fast on the H100 (22% on the H200).
# Now the inputs go round copies of those weights (--weight-copies, 0 = enough to exceed L2 3 times: 4 here).
#   M = 1 with the copies, then with one copy (as before), then M = 4 with the copies.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
byhits() {  # name, M, then more flags
  local name=$1 m=$2
  shift 2
  timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/$name" --m "$m" --seeds 0,1 --rounds 3 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep "us seed" "$OUT/$name.log" | awk '{print $7, $8}' | paste -sd' '
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/$name/by_hits.json" | tail -1
}
byhits m1_copies 1
byhits m1_one_copy 1 --weight-copies 1
byhits m4_copies 4
