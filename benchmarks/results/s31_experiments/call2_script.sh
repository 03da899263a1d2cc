#!/usr/bin/env bash
# Session 31, call 2: (preamble + shared) / shared on the current code, which has not been measured since session 18
# (the shared expert's launch has changed since: computed dense alignment, PDL between its launches), with the new
# "norm+shared" variant (the norm kernel, then the shared expert): how much of the ratio is the norm that the shared
# expert must wait for, and how much the routing beside it. fp8 shared expert, then the bf16 one, on fp8 experts.
set -u
START=$(date +%s)
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv
overlap() {  # name, then flags
  local name=$1
  shift
  timeout -k 5 250 python benchmarks/gpu_overlap.py --out "$OUT/$name" --m 1,4 --dtypes fp8 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - START )) s"
  grep "^| fp8" "$OUT/$name/overlap.md"
}
overlap shared_fp8 --shared-on kernels-fp8
overlap shared_bf16 --shared-on kernels
