#!/usr/bin/env bash
# Session 23, call 4: the bounds now in experts.py (routed GEMM2 early at M = 2-32, the shared expert's at 2-24: where
# calls 1-3 measured it faster). The layer's GPU tests on dsv3-ep8 (now at M = 1, 4, 30, 33: at 30 the routed launch
# alone places GEMM2 early); then at dsv3-ep8 fp8 (fp8 shared expert) M = 24-40, each bound moved past the gap
# between the measured points: routed early to M = 40, shared to 32.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 3")
timeout -k 5 250 python -m pytest -q -p no:cacheprovider $XDIST -m gpu tests/test_layer.py tests/test_expert_kernels.py \
  -k "test_layer_on_gpu and ep8 or pdl" > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?"; tail -n 4 "$OUT/gpu_tests.log"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 \
  --m 24,28,32,36,40 --rounds 3 --variant auto: --variant h:experts.EXPERT_PDL=h \
  --variant routed-to-40:experts.ROUTED_GEMM2_EARLY_BELOW_M=41 \
  --variant shared-to-32:experts.SHARED_GEMM2_EARLY_BELOW_M=33 > "$OUT/ab_ep8_fp8.txt" 2>&1
tail -5 "$OUT/ab_ep8_fp8.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
