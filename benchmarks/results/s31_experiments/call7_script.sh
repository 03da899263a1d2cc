#!/usr/bin/env bash
# Session 31, call 7. Call 6: forked before the norm, the shared expert's branch came first in the graph and the
# norm started only at ~9.6 µs. New variant "pre+shared unblocked late": the shared expert still waits for nothing
# (an event recorded before the norm, inputs made beforehand) but is queued once the norm is. Does the norm then
# start at once, and where does the ratio go? The bound for a shared expert that makes its own input, if it does.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
timeout -k 5 150 python benchmarks/gpu_overlap.py --out "$OUT/late" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 \
  --profile "pre+shared unblocked late" > "$OUT/late.log" 2>&1
echo "late rc=$? at $(( $(date +%s) - START )) s"
grep "^| fp8" "$OUT/late.log"
sed -n '/graph replay/,$p' "$OUT/late/overlap.md" | grep "^|\|busy"
python - "$OUT/late/overlap.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["rows"]:
    print("M", row["M"])
    for k in row["profile"]["graph replay"]["kernels"]:
        print("  ", k["name"][:28], k["stream"], k["start_us"], k["end_us"], k["programs"])
PY
