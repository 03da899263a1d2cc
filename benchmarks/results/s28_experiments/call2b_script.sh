#!/usr/bin/env bash
# Session 28, call 2 cut to the device time left (340 s with the start): call2_script.sh at M = 1 only, plan
# against pf512 (shared_expert.L2_PREFETCH_K=512), then the layer's bits with and without the prefetch.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python benchmarks/gpu_layer_by_hits.py --out "$OUT/m1" --m 1 --seeds 0,1 \
  --rounds 2 --variant plan: --variant pf512:shared_expert.L2_PREFETCH_K=512 --profile-hits 0 > "$OUT/m1.log" 2>&1
echo "m1 rc=$? at $(( $(date +%s) - START )) s"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/m1/by_hits.json"
timeout -k 5 60 python -m pytest -q tests/test_layer.py tests/test_shared_expert.py -k "prefetch" -p no:warnings \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - START )) s"; tail -3 "$OUT/tests.log"
grep -A12 "one call's kernels" "$OUT/m1.log" | head -60
