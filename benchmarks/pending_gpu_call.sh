#!/usr/bin/env bash
# What session 12 prepared but could not run (no GPU was lent): one device call, ~8 minutes on a warm
# H100. Run from the repository root with OUT set; then copy $OUT into benchmarks/results/s13_*/,
# write the outcome into benchmarks/experts_notes.md / preamble_notes.md, and delete this script.
#   1. the new paths on CUDA: GEMM2 making h from GEMM1's split sums, eager and under CUDA graphs, every PDL mode;
#   2. benchmarks/gpu_stream_probe.py: what limits GEMM1 on one fp8 expert at M = 1 (issue 5);
#   3. in-process A/B of experts.COMBINE_IN_GEMM2 (expert block alone, then the layer with the fp8 shared expert,
#      beside the fp8 shared expert computed in the routed launches, "fused", last measured before session 9's PDL);
#   4. in-process A/B of route_align_kernel.ROUTE_ALIGN_WARPS (dsv3 preamble M = 1, dsv3-ep8 layer);
#   5. the dsv3 preamble's kernels under graph replay at M = 1, 4, 16 (where issue 4's time goes);
#   6. the bench's preamble part, now with the alignment (issue 4's figures; sessions 8-11 timed the op without it).
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
timeout -k 5 120 python -m pytest -v -p no:cacheprovider tests/test_expert_kernels.py tests/test_bench.py \
  tests/test_gpu_stream_probe_smoke.py -k "gemm2_making or (programmatic and split) or preamble_part or probe" \
  >"$OUT/tests.log" 2>&1
echo "tests: exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
timeout -k 5 100 python benchmarks/gpu_stream_probe.py --json "$OUT/stream_probe.json" 2>&1 | tee "$OUT/stream_probe.txt"
C=experts.COMBINE_IN_GEMM2=True
S=layer.options.shared_fp8=True
timeout -k 5 150 python benchmarks/gpu_layer_ab.py --part experts --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 \
  --variant kernel:experts.COMBINE_IN_GEMM2=False --variant gemm2:$C \
  --variant gemm2pdl:$C,experts.EXPERT_PDL=h+gemm2 \
  --variant gemm2pdl0:$C,experts.EXPERT_PDL=h+gemm2,experts.PREFETCH_BYTES=0 2>&1 | tee "$OUT/combine_experts_ab.txt"
timeout -k 5 160 python benchmarks/gpu_layer_ab.py --part layer --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 \
  --variant kernel:$S --variant gemm2:$S,$C --variant gemm2pdl:$S,$C,experts.EXPERT_PDL=h+gemm2 \
  --variant ra8:$S,route_align_kernel.ROUTE_ALIGN_WARPS=8 \
  --variant fused:$S,layer.options.shared_expert=fused 2>&1 | tee "$OUT/combine_layer_ab.txt"
timeout -k 5 60 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 1 --rounds 3 \
  --variant ra4:route_align_kernel.ROUTE_ALIGN_WARPS=4 --variant ra8:route_align_kernel.ROUTE_ALIGN_WARPS=8 \
  --variant ra16:route_align_kernel.ROUTE_ALIGN_WARPS=16 2>&1 | tee "$OUT/route_align_warps_ab.txt"
timeout -k 5 60 python benchmarks/gpu_layer_timeline.py --part preamble --shape dsv3 --dtype bf16 --m 1,4,16 \
  --out "$OUT" 2>&1 | tee "$OUT/preamble_timeline.txt"
timeout -k 5 90 python -m moe_fusion.tools.bench --shape dsv3 --parts preamble --m 1,2,4,8,16,32,64 \
  --variants moe_fusion --json "$OUT/preamble_bench.json" --markdown "$OUT/preamble_bench.md" >"$OUT/preamble_bench.log" 2>&1
echo "preamble bench: exit $?"; grep "^| dsv3" "$OUT/preamble_bench.md"
