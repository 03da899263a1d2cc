#!/usr/bin/env bash
# Session 24, call 2: does the weights' layout limit how fast one wave streams them? gpu_stream_probe.py's
# stream kernel with GEMM1's and GEMM2's dsv3-shared fp8 M = 1 grids, each step's tile as BLOCK_N pieces of
# the stored rows against one contiguous run (--layouts), twice.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for run in 1 2; do
  timeout -k 5 120 python benchmarks/gpu_stream_probe.py --only layouts --json "$OUT/layouts_$run.json" 2>&1 | tee "$OUT/layouts_$run.txt"
done
