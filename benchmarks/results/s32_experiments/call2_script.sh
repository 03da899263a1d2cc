#!/usr/bin/env bash
# Session 32 call 2. Call 1: even waiting for nothing ("unblocked late") the fp8 shared expert reads 1.132 at M = 4
# beside the preamble (1.084 at M = 1), so no way of hiding the norm alone gets M = 4 within 1.1. What the routing
# beside it costs at M = 4, with fewer router programs (fewer split-K atomics) and with one routing-and-alignment
# kernel instead of two, and with the router unsplit (no split-K atomics: the deterministic mode's router); the
# unblocked-late timeline profiled.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
run() {  # name, prelude (python statements), then gpu_overlap arguments
  local name=$1 prelude=$2; shift 2
  timeout -k 5 120 python -c "$prelude
import runpy, sys
sys.argv = ['gpu_overlap.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_overlap.py', run_name='__main__')" --out "$OUT/$name" --dtypes fp8 --shared-on kernels-fp8 \
    "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep "^| fp8" "$OUT/$name.log" | sort -u
}
run base "pass" --m 1,4 --profile "pre+shared unblocked late"
sed -n '/graph replay/,$p' "$OUT/base/overlap.md" | grep "^|\|busy"
run rpps1 "import moe_fusion.lowering.preamble as p; p.ROUTER_PROGRAMS_PER_SM = 1" --m 4
run rpps05 "import moe_fusion.lowering.preamble as p; p.ROUTER_PROGRAMS_PER_SM = 0.5" --m 4
run ra1024 "import moe_fusion.lowering.route_align_kernel as r; r.ROUTE_ALIGN_MAX_TILE = 1024" --m 4
run rpps1_ra1024 "import moe_fusion.lowering.preamble as p, moe_fusion.lowering.route_align_kernel as r
p.ROUTER_PROGRAMS_PER_SM = 1; r.ROUTE_ALIGN_MAX_TILE = 1024" --m 4
run router_unsplit "import moe_fusion.lowering.preamble as p
config = p.router_config
p.router_config = lambda *args, **kw: config(*args, **{**kw, 'split_k': False})" --m 4
run base_again "pass" --m 4
