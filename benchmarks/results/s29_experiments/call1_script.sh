#!/usr/bin/env bash
# Session 29, call 1: session 28's call 2 as written (the shared GEMM1 L2 prefetch against the plan at M = 1 and 4,
# then its GPU tests). The device ran `bash benchmarks/results/s28_experiments/call2_script.sh`.
exec bash "$(dirname "$0")/../s28_experiments/call2_script.sh"
