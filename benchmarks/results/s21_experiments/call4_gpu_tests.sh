#!/usr/bin/env bash
# Session 21, call 4: EXPERT_PDL's default is now h+gemm2 without the L2 prefetch (calls 2-3). The GPU tests of
# the layer with the shared expert on the side stream (stream-late among them) and under CUDA-graph capture, and of
# the expert block's PDL modes.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 4")
timeout -k 5 240 python -m pytest -q -m gpu $XDIST tests/test_layer.py -k "late or graphs or stream" -p no:cacheprovider \
  2>&1 | tail -4
timeout -k 5 60 python -m pytest -q tests/test_expert_kernels.py -k programmatic -p no:cacheprovider 2>&1 | tail -2
