#!/usr/bin/env bash
# Session 15, call 2 (H100; never ran: no machine came, folded into call3.sh), from the repository root, with .scratch carried:
#  1. .scratch/overlap_probe2.py: the fp8 shared expert beside the preamble with a high-priority side
#     stream and with its grids 16 SMs short, forked after the norm and before it (issue 6);
#  2. the randomized routing tests with sort_fits' fence lifted at MOE_FUSION_RANDOM_SCALE=5 (issue 4).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 200 python .scratch/overlap_probe2.py 2>&1 | tee "$OUT/overlap_probe2.txt"
PYTHONPATH=$PWD:$PWD/.scratch MOE_FUSION_RANDOM_SCALE=5 timeout -k 5 150 python -m pytest -q -p no:cacheprovider -n 8 \
  -p unfenced_sort tests/test_random_preamble.py -k routing_kernel >"$OUT/unfenced_routing_scale5.log" 2>&1
echo "unfenced routing tests, scale 5: exit $?"; tail -n 2 "$OUT/unfenced_routing_scale5.log"
