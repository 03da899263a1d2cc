#!/usr/bin/env bash
# Session 20, call 2: the dsv3-ep8 fp8 layer (fp8 shared expert) timed by how many local experts a call's
# routing hits (benchmarks/gpu_layer_by_hits.py, the bench's weights, inputs and timing), seeds 0 and 1, for
# the plan, "stream" and the router at 1 program per SM; then moe-fusion bench seed 0 on the same machine.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
timeout -k 5 330 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0,1 \
  --variant plan: --variant stream:layer.options.shared_expert=stream \
  --variant router1:preamble.ROUTER_PROGRAMS_PER_SM=1 2>&1 | grep -v Warning
timeout -k 5 80 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,4 --dtype fp8 \
  --variants moe_fusion --sets 32 --seed 0 --json "$OUT/bench_seed0.json" --markdown /tmp/s0.md > /dev/null 2>&1
grep "^| dsv3" /tmp/s0.md
