#!/usr/bin/env bash
# Session 20, call 9: the issue-6 dsv3-ep8 fp8 figures by run_gpu.sh's BY_HITS_S step (fp8 shared expert, the plan,
# seeds 0 and 1, 3 rounds), with nvidia-smi's clocks, power and throttle reasons at start and end.
set -u
OUT=${OUT:-benchmarks/out}
RUN_GPU_TESTS=0 BENCH_SHAPES= BENCH_FP8_SHAPES= BY_HITS_S=240 MOE_FUSION_SHARED_FP8=1 RUN_BUDGET_S=330 \
  bash benchmarks/run_gpu.sh 2>&1 | tail -n 12
python -c "
import json; m = json.load(open('$OUT/by_hits.json'))['meta']; print(m['gpu_state_at_start']); print(m.get('gpu_state_at_end'))"
