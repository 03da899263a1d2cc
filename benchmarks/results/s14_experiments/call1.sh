#!/usr/bin/env bash
# Session 14, call 1 (H100), from the repository root: what session 13 left unmeasured.
#  1. in-process A/B: the routing kernel's one-row programs on one warp (one max per pick) or on 4 warps
#     (picks by sort), dsv3 bf16 preamble, M = 2..64 (issue 4);
#  1b. in-process A/B: route_align (routing and alignment in one program) for up to 16 tokens, its rows
#     routed as one tile (route_align_kernel.ROUTE_ALIGN_MAX_TILE), on 4 or 8 warps, dsv3;
#  1d. in-process A/B: the router's tile for up to 16 rows (experts x K), each program's K chunk one tile
#     loaded before the PDL wait, fewer split-K atomics (preamble.ROUTER_NARROW_BLOCK_E/K);
#  1c. in-process A/B: the many-program alignment loading the ids once for both passes (align_kernel.ALIGN_ONE_LOAD);
#  2. the bench's preamble part with the picks by sort, dsv3, M = 1..64 (issue 4);
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
T=topk_kernel.ONE_WARP_ROUTE_TILE
timeout -k 5 110 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 2,4,16,64 --rounds 3 \
  --variant w1:$T=256 --variant w4sort:$T=0 2>&1 | tee "$OUT/routing_warps_ab.txt"
R=route_align_kernel
timeout -k 5 130 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 2,4,8,16 --rounds 3 \
  --variant base:$R.ROUTE_ALIGN_MAX_TILE=256 --variant t4096:$R.ROUTE_ALIGN_MAX_TILE=4096 \
  --variant t4096w8:$R.ROUTE_ALIGN_MAX_TILE=4096,$R.ROUTE_ALIGN_WARPS=8 2>&1 | tee "$OUT/route_align_tile_ab.txt"
P=preamble
timeout -k 5 130 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 1,4,16 --rounds 3 \
  --variant e128k64:$P.ROUTER_NARROW_BLOCK_E=128,$P.ROUTER_NARROW_BLOCK_K=64 \
  --variant e64k256:$P.ROUTER_NARROW_BLOCK_E=64,$P.ROUTER_NARROW_BLOCK_K=256 \
  --variant e32k512:$P.ROUTER_NARROW_BLOCK_E=32,$P.ROUTER_NARROW_BLOCK_K=512 \
  --variant e32k256:$P.ROUTER_NARROW_BLOCK_E=32,$P.ROUTER_NARROW_BLOCK_K=256 2>&1 | tee "$OUT/router_tile_ab.txt"
timeout -k 5 70 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 16,64 --rounds 3 \
  --variant load2:align_kernel.ALIGN_ONE_LOAD=False --variant load1:align_kernel.ALIGN_ONE_LOAD=True 2>&1 \
  | tee "$OUT/align_one_load_ab.txt"
timeout -k 5 120 python -m moe_fusion.tools.bench --shape dsv3 --parts preamble --m 1,2,4,8,16,32,64 --variants moe_fusion \
  --json "$W/preamble_bench.json" --markdown "$OUT/preamble_bench.md" >"$W/preamble_bench.log" 2>&1
echo "preamble bench: exit $?"; grep "^| dsv3" "$OUT/preamble_bench.md"
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
