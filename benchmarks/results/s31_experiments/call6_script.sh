#!/usr/bin/env bash
# Session 31, call 6. At M = 4 the fp8 shared expert runs ~2-3 µs longer beside the preamble's routing even when it
# waits for nothing (pre+shared unblocked 1.13). Timelines to see which kernels it runs beside: the shared expert
# alone and unblocked, profiled (gpu_overlap --profile, new); then the same unblocked with the preamble's launches
# not programmatic dependents (preamble.USE_PDL = False), so that no preamble program waits resident on an SM.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
overlap() {  # name, python prelude, then flags
  local name=$1 prelude=$2
  shift 2
  timeout -k 5 100 python -c "$prelude
import runpy, sys
sys.argv = ['gpu_overlap.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_overlap.py', run_name='__main__')" --out "$OUT/$name" --m 4 --dtypes fp8 \
    --shared-on kernels-fp8 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep "^| fp8" "$OUT/$name.log"
  sed -n '/graph replay/,$p' "$OUT/$name/overlap.md" | grep "^|\|busy"
}
overlap alone "" --profile shared
overlap unblocked "" --profile "pre+shared unblocked"
overlap unblocked_no_pdl "import moe_fusion.lowering.preamble as p; p.USE_PDL = False" --profile "pre+shared unblocked"
