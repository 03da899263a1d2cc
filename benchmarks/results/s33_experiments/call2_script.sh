#!/usr/bin/env bash
# Session 33 call 2: the probe with the one-stream chain (norm, shared GEMM1 as its programmatic dependent, routing
# placed behind it; a timing proxy whose router skips its wait for the norm), plan routing and session 32's best.
# Applies the patch to the device's copy of the tree only.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
git apply benchmarks/results/s33_experiments/gemm1_after_norm_pdl_prefetch.patch || exit 1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
P=benchmarks/results/s33_experiments/probe_interference.py
for a in "" "--routing" ""; do
  timeout 150 python $P --m 1,4 $a 2>&1 | grep -v -i warn | tail -4
done
