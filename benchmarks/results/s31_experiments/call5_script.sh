#!/usr/bin/env bash
# Session 31, call 5. Calls 2-4: the fp8 shared expert waits 2.6-2.9 µs for the norm kernel, nearly all of its excess
# over 1.1 at M = 1, and the norm is on the routed chain's path too. The norm spreads a 7168-wide row over programs of
# SMALL_M_CHUNK_GROUPS = 4 groups of 128 (14 programs at M = 1); v5 measured 4 against 8 and 64, never fewer.
# By hit count (weights out of L2): the plan, 2 groups (28 programs), 1 group (56); then the ratio with each.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
byhits() {  # name, M
  local name=$1 m=$2
  timeout -k 5 240 python benchmarks/gpu_layer_by_hits.py --out "$OUT/$name" --m "$m" --seeds 0,1 --rounds 2 \
    --variant plan: --variant g2:norm_quant_kernel.SMALL_M_CHUNK_GROUPS=2 \
    --variant g1:norm_quant_kernel.SMALL_M_CHUNK_GROUPS=1 > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/$name/by_hits.json" | grep "^| dsv3"
}
overlap() {  # name, groups
  local name=$1 groups=$2
  timeout -k 5 100 python -c "import moe_fusion.lowering.norm_quant_kernel as n; n.SMALL_M_CHUNK_GROUPS = $groups
import runpy, sys
sys.argv = ['gpu_overlap.py'] + sys.argv[1:]
runpy.run_path('benchmarks/gpu_overlap.py', run_name='__main__')" --out "$OUT/$name" --m 1,4 --dtypes fp8 \
    --shared-on kernels-fp8 > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep "^| fp8" "$OUT/$name.log"
}
byhits m1 1
byhits m4 4
overlap overlap_g4 4
overlap overlap_g2 2
overlap overlap_g1 1
