#!/usr/bin/env bash
# Session 17, call 11 (H100): is the intermittent cudaErrorInvalidAddressSpace of
# `gpu_overlap.py --m 1,4 --dtypes bf16,fp8` tied to cuBLAS on the side stream? Two runs each: as is (shared
# expert on cuBLAS, forked to the side stream), with cuBLAS's workspace off, with the shared expert on the expert
# kernels instead; each cut at 40 s (a run that errs does so in its first rows).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
run() {
  local label=$1; shift
  env "$@" timeout 40 python benchmarks/gpu_overlap.py --out /tmp/o --m 1,4 --dtypes bf16,fp8 $EXTRA > /tmp/run.log 2>&1
  echo "$label rc=$? rows=$(grep -c '^\[overlap\]' /tmp/run.log) $(grep -o 'CUDA error: [a-z /]*' /tmp/run.log | head -1)"
}
for i in 1 2; do
  EXTRA= run "cublas-side" X=1
  EXTRA= run "cublas-side, CUBLAS_WORKSPACE_CONFIG=:0:0" CUBLAS_WORKSPACE_CONFIG=:0:0
  EXTRA="--shared-on kernels" run "kernels-side" X=1
done
