#!/usr/bin/env bash
# Session 24, call 3: how many programs should one wave of GEMM1's / GEMM2's weight stream have?
# gpu_stream_probe.py --only grids (one program per item, all resident), twice.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for run in 1 2; do
  timeout -k 5 120 python benchmarks/gpu_stream_probe.py --only grids --json "$OUT/grids_$run.json" 2>&1 | tee "$OUT/grids_$run.txt"
done
