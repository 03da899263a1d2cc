#!/usr/bin/env bash
# Session 29, call 7: where the slow plan readings come from. On one H100 (calls 3-6) the plan read 44.8 / 44.8 /
# 46.7 / 47.6 us at M = 1 in four processes; in the slow ones the first timing (seed 0, round 0, 0 hits) read 29.3-29.5
# and every later one of that seed 31-34, whatever the variant, while calls 3-4 stayed at ~30 throughout. Calls 3-4
# timed the plan alone or router variants; calls 1, 5, 6 timed variants of the expert block or the output beside it.
#   A: the plan under three names (no setting differs): slow later rounds here mean the process's history of timings,
#      not other kernels.
#   B: call 6's M = 1 again (plan, out512, out1024).
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
run() {
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python benchmarks/gpu_layer_by_hits.py --out "$OUT/$1" --m 1 --seeds 0,1 \
    --rounds 3 "${@:2}" > "$OUT/$1.log" 2>&1
  echo "$1 rc=$? at $(( $(date +%s) - START )) s"
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/$1/by_hits.json"
  python - "$OUT/$1/by_hits.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("in timing order (seed, hits, variant, us):")
print(" ".join(f"s{r['seed']}h{r['hits']}:{r['variant']}:{r['us']:.1f}" for r in rows))
PY
}
run A --variant plan: --variant plan2: --variant plan3:
run B --variant plan: --variant out512:layer_output_kernel.BLOCK=512 --variant out1024:layer_output_kernel.BLOCK=1024
