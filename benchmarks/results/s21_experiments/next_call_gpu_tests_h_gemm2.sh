#!/usr/bin/env bash
# Written in session 21, not run (no device time was left). EXPERT_PDL=h+gemm2 without the L2 prefetch was faster
# than the default h in calls 2-3; before it becomes the default, the GPU tests under it: the layer with the
# shared expert on the side stream (stream-late among them) and under CUDA-graph capture, and the expert block's
# PDL modes. If they pass, set experts.EXPERT_PDL's default to "h+gemm2" (and README's line), then time the
# bench's layer part (dsv3-ep8 fp8, M = 1 and 4) by hit count to confirm. About 3 minutes on the H100.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_EXPERT_PDL=h+gemm2
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 4")
timeout -k 5 240 python -m pytest -q -m gpu $XDIST tests/test_layer.py tests/test_shared_expert.py -p no:cacheprovider 2>&1 | tail -4
timeout -k 5 60 python -m pytest -q tests/test_expert_kernels.py -k programmatic -p no:cacheprovider 2>&1 | tail -2
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0,1 \
  --rounds 3 --variant h:experts.EXPERT_PDL=h --variant h+gemm2: > "$OUT/log.txt" 2>&1
tail -1 "$OUT/log.txt"
