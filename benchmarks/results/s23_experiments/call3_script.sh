#!/usr/bin/env bash
# Session 23, call 3: the landed rule (experts.GEMM2_EARLY_M: routed GEMM2 early at M = 2-47, the shared expert's
# at M = 2-31). GPU tests of the layer on dsv3-ep8 (M = 1, 4, 33: at 33 the routed launch places GEMM2 early and
# the shared one does not) and the expert PDL tests; then auto against h and h+gemm2 at dsv3-ep8 fp8 M = 1-64 (fp8 shared
# expert), and at M = 16-64 with the default bf16 shared expert.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 3")
timeout -k 5 250 python -m pytest -q -p no:cacheprovider $XDIST -m gpu tests/test_layer.py tests/test_expert_kernels.py \
  -k "ep8 or pdl" > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?"; tail -n 4 "$OUT/gpu_tests.log"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 170 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 \
  --m 1,2,4,8,16,24,32,40,48,64 --rounds 3 --variant auto: --variant h:experts.EXPERT_PDL=h \
  --variant h+gemm2:experts.EXPERT_PDL=h+gemm2 > "$OUT/ab_ep8_fp8.txt" 2>&1
tail -4 "$OUT/ab_ep8_fp8.txt"
timeout -k 5 120 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 16,32,48,64 --rounds 3 \
  --variant auto: --variant h:experts.EXPERT_PDL=h --variant h+gemm2:experts.EXPERT_PDL=h+gemm2 \
  > "$OUT/ab_ep8_fp8_bf16_shared.txt" 2>&1
tail -4 "$OUT/ab_ep8_fp8_bf16_shared.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
