#!/usr/bin/env bash
# Session 26, call 5 (run as one command line on the machine calls 3-4 had warm): the plan by hit count at M = 1 and 4,
# seed 1, on the code of this session's start (the new path was off by default).
export PYTHONPATH=$PWD
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out $OUT/plan --m 1,4 --seeds 1 --rounds 2 \
  > $OUT/plan.log 2>&1
python benchmarks/gpu_layer_by_hits.py --summarize $OUT/plan/by_hits.json | tail -2
