#!/usr/bin/env bash
# Session 13's calls 1 and 2 (H100), as run on commit bf4388e (benchmarks/pending_gpu_call.sh then; a
# record: experts.COMBINE_IN_GEMM2 is gone since). What session 12 prepared but could not run:
#   OUT=$OUT bash benchmarks/pending_gpu_call.sh experts     # 1-3, 8: call1_*
#   OUT=$OUT bash benchmarks/pending_gpu_call.sh layer       # 4-7: call2_*
#   1. the new paths on CUDA: GEMM2 making h from GEMM1's split sums (eager and under CUDA graphs, every PDL
#      mode), the stream probe's kernels, the bench's aligned preamble;
#   2. benchmarks/gpu_stream_probe.py: what limits GEMM1 on one fp8 expert at M = 1 (issue 5);
#   3. in-process A/B of experts.COMBINE_IN_GEMM2, the expert block alone;
#   4. the same in the layer with the fp8 shared expert, beside route_align on 8 warps and the fp8 shared
#      expert computed in the routed launches ("fused", last measured before session 9's PDL);
#   5. in-process A/B of route_align_kernel.ROUTE_ALIGN_WARPS, the dsv3 preamble at M = 1;
#   6. the dsv3 preamble's kernels under graph replay at M = 1, 4, 16 (where issue 4's time goes);
#   7. the bench's preamble part, now with the alignment (issue 4's figures; sessions 8-11 timed the op without it);
#   8. in-process A/B of preamble.ROUTER_PROGRAMS_PER_SM at dsv3 M = 16, 64 (fewer split-K atomics per logit).
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
C=experts.COMBINE_IN_GEMM2=True
S=layer.options.shared_fp8=True
case "${1:-}" in
experts)
  timeout -k 5 150 python -m pytest -v -p no:cacheprovider tests/test_expert_kernels.py tests/test_bench.py \
    tests/test_gpu_stream_probe_smoke.py -k "gemm2_making or (programmatic and split) or preamble_part or probe" \
    >"$OUT/tests.log" 2>&1
  echo "tests: exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
  timeout -k 5 120 python benchmarks/gpu_stream_probe.py --json "$OUT/stream_probe.json" 2>&1 | tee "$OUT/stream_probe.txt"
  timeout -k 5 200 python benchmarks/gpu_layer_ab.py --part experts --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 \
    --variant kernel:experts.COMBINE_IN_GEMM2=False --variant gemm2:$C \
    --variant gemm2pdl:$C,experts.EXPERT_PDL=h+gemm2 \
    --variant gemm2pdl0:$C,experts.EXPERT_PDL=h+gemm2,experts.PREFETCH_BYTES=0 2>&1 | tee "$OUT/combine_experts_ab.txt"
  timeout -k 5 90 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 16,64 --rounds 3 \
    --variant pps2:preamble.ROUTER_PROGRAMS_PER_SM=2 --variant pps1:preamble.ROUTER_PROGRAMS_PER_SM=1 \
    --variant pps05:preamble.ROUTER_PROGRAMS_PER_SM=0.5 2>&1 | tee "$OUT/router_split_ab.txt"
  ;;
layer)
  timeout -k 5 240 python benchmarks/gpu_layer_ab.py --part layer --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 \
    --variant kernel:$S --variant gemm2:$S,$C --variant gemm2pdl:$S,$C,experts.EXPERT_PDL=h+gemm2 \
    --variant ra8:$S,route_align_kernel.ROUTE_ALIGN_WARPS=8 \
    --variant fused:$S,layer.options.shared_expert=fused 2>&1 | tee "$OUT/combine_layer_ab.txt"
  timeout -k 5 80 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 1 --rounds 3 \
    --variant ra4:route_align_kernel.ROUTE_ALIGN_WARPS=4 --variant ra8:route_align_kernel.ROUTE_ALIGN_WARPS=8 \
    --variant ra16:route_align_kernel.ROUTE_ALIGN_WARPS=16 2>&1 | tee "$OUT/route_align_warps_ab.txt"
  timeout -k 5 80 python benchmarks/gpu_layer_timeline.py --part preamble --shape dsv3 --dtype bf16 --m 1,4,16,64 \
    --out "$OUT" 2>&1 | tee "$OUT/preamble_timeline.txt"
  timeout -k 5 120 python -m moe_fusion.tools.bench --shape dsv3 --parts preamble --m 1,2,4,8,16,32,64 \
    --variants moe_fusion --json "$OUT/preamble_bench.json" --markdown "$OUT/preamble_bench.md" >"$OUT/preamble_bench.log" 2>&1
  echo "preamble bench: exit $?"; grep "^| dsv3" "$OUT/preamble_bench.md"
  ;;
*)
  echo "usage: OUT=DIR bash benchmarks/pending_gpu_call.sh experts|layer" >&2
  exit 2
  ;;
esac
