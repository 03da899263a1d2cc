#!/usr/bin/env bash
# Session 31, call 7. Call 6: forked before the norm, the shared expert's branch came first in the graph and the
# norm started only at ~9.6 µs. New variant "pre+shared unblocked late": the shared expert still waits for nothing
# (an event recorded before the norm, inputs made beforehand) but is queued once the norm is. Does the norm then
# start at once, and where does the ratio go? The bound for a shared expert that makes its own input, if it does.
# Then M = 4 with the top-k and alignment kernels launched after the router ends instead of as its programmatic
# dependents (session31.md part 5: parked on 5 SMs they may leave 127 for the shared GEMM1's 128 one-item programs).
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
timeout -k 5 100 python -c "import moe_fusion.lowering.topk_kernel as t, moe_fusion.lowering.align_kernel as a
select, align = t.select_experts, a.align_pairs
t.select_experts = lambda *args, pdl=False, **kw: select(*args, pdl=False, **kw)
a.align_pairs = lambda *args, pdl=False, **kw: align(*args, pdl=False, **kw)
import runpy, sys
sys.argv = ['gpu_overlap.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_overlap.py', run_name='__main__')" --out "$OUT/routing_not_pdl" --m 4 --dtypes fp8 \
  --shared-on kernels-fp8 > "$OUT/routing_not_pdl.log" 2>&1
echo "routing_not_pdl rc=$? at $(( $(date +%s) - START )) s"
grep "^| fp8\|_kernel" "$OUT/routing_not_pdl.log" | head -20
