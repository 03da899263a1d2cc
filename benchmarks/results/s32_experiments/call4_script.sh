#!/usr/bin/env bash
# Session 32 call 4. The fp8 shared GEMM1 is one wave of 128 one-item programs (split_k 4, block_n 64): a program
# that waits for an SM the preamble holds delays the whole launch. Two finer grids of 256 programs, two per SM
# (split_k 8, or block_n 32), alone and beside the preamble (gpu_overlap; "layer stream" gives the layer at these
# inputs' hits), and the finer split with call 2's best routing (one router program per SM, one routing-and-
# alignment kernel). The ratio's denominator is the same launch alone.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
GEMM1="import dataclasses, moe_fusion.lowering.experts as e
tuned = e.shared_expert_config
def gemm1(**tiles):
    e.shared_expert_config = lambda *a: dataclasses.replace(tuned(*a), gemm1=dataclasses.replace(tuned(*a).gemm1, **tiles))"
ROUTING="import moe_fusion.lowering.preamble as p, moe_fusion.lowering.route_align_kernel as r
p.ROUTER_PROGRAMS_PER_SM = 1; r.ROUTE_ALIGN_MAX_TILE = 1024"
run() {  # name, prelude (python statements), then gpu_overlap arguments
  local name=$1 prelude=$2; shift 2
  timeout -k 5 120 python -c "$prelude
import runpy, sys
sys.argv = ['gpu_overlap.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_overlap.py', run_name='__main__')" --out "$OUT/$name" --dtypes fp8 --shared-on kernels-fp8 \
    --m 1,4 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep "^| fp8" "$OUT/$name.log" | sort -u
}
run base "pass"
run s8p2 "$GEMM1
gemm1(split_k=8, programs_per_sm=2)"
run n32p2 "$GEMM1
gemm1(block_n=32, programs_per_sm=2)"
run s8p2_routing "$GEMM1
gemm1(split_k=8, programs_per_sm=2)
$ROUTING"
