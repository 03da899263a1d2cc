#!/usr/bin/env bash
# Session 15, call 3 (H100), from the repository root, with .scratch carried. Issue 6 first:
#  1. the layer's GPU tests of the side-stream shared expert, with its own norm forked before the preamble
#     (LayerPlan.shared_own_norm, the new default) and against the fork after the norm, bit for bit;
#  2. gpu_overlap.py, dsv3-ep8 fp8, fp8 shared expert (now with its own norm), M = 1, 4;
#  3. .scratch/overlap_probe3.py: shared expert after the norm / with its own norm / on fp8 groups made
#     beforehand, each with a high-priority side stream and with grids 16 SMs short;
#  4. gpu_layer_ab.py: the dsv3-ep8 fp8 layer (fp8 shared expert) with and without its own norm, M = 1, 2, 4;
#  5. issue 4: the randomized routing tests with sort_fits' fence lifted (now removed) at MOE_FUSION_RANDOM_SCALE=5.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 140 python -m pytest -q -p no:cacheprovider -n 4 tests/test_layer.py tests/test_gpu_overlap_smoke.py \
  -k "own_norm or (on_gpu and stream) or cuda_graphs or overlap" >"$OUT/layer_stream_tests.log" 2>&1
echo "layer stream tests: exit $?"; tail -n 3 "$OUT/layer_stream_tests.log"
timeout -k 5 75 python benchmarks/gpu_overlap.py --out "$OUT" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 2>&1 \
  | grep -E "^\[overlap\]|^\| (fp8|_|expert|gemm)"
rm -f "$OUT/overlap_trace.json"
timeout -k 5 90 python .scratch/overlap_probe3.py 2>&1 | tee "$OUT/overlap_probe3.txt"
timeout -k 5 100 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 \
  --variant after:layer.options.shared_fp8=True,layer.options.shared_own_norm=False \
  --variant own:layer.options.shared_fp8=True,layer.options.shared_own_norm=True 2>&1 | tee "$OUT/layer_own_norm_ab.txt" | tail -n 8
PYTHONPATH=$PWD:$PWD/.scratch MOE_FUSION_RANDOM_SCALE=5 timeout -k 5 90 python -m pytest -q -p no:cacheprovider -n 12 \
  tests/test_random_preamble.py -k routing_kernel >"$OUT/routing_scale5.log" 2>&1
echo "routing tests, scale 5: exit $?"; tail -n 2 "$OUT/routing_scale5.log"
