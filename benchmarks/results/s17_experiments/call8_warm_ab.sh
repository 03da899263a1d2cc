#!/usr/bin/env bash
# Session 17, call 8 (H100): the L2 warm of the shared expert's first GEMM1 lines (MOE_FUSION_SHARED_WARM_LINES),
# A/B with the overlap (dsv3-ep8 fp8, fp8 shared expert, weights rotated) and the layer's GPU test.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 60 python -m pytest -q -p no:cacheprovider tests/test_layer.py -k l2_warm 2>&1 | tail -n 3
for lines in 0 4 8 0 4 8; do
  MOE_FUSION_SHARED_WARM_LINES=$lines timeout -k 5 60 python benchmarks/gpu_overlap.py --out /tmp/o$lines --m 1,4 --dtypes fp8 \
    --shared-on kernels-fp8 2>&1 | grep "^\[overlap\]" | sed "s/^/lines=$lines /" | cut -c1-260
done
