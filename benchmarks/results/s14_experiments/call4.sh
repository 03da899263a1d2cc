#!/usr/bin/env bash
# Session 14, call 4 (H100), from the repository root, the preamble defaults of commit 833bc7e in:
#  1. in-process A/B of the router's tile for 64 rows (M = 32, 64): experts x K and warps
#     (preamble.ROUTER_WIDE_BLOCK_E/K, ROUTER_WIDE_WARPS), dsv3 bf16 preamble (issue 4);
#  2. the randomized preamble tests on CUDA (MOE_FUSION_RANDOM_SCALE=5);
#  3. the bench's layer part, dsv3-ep8 fp8, M = 1, 2, 4, shared expert in bf16 and in fp8 (issue 6);
#  4. gpu_overlap.py, dsv3-ep8 fp8 with the fp8 shared expert (issue 6).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
P=preamble
timeout -k 5 90 python benchmarks/gpu_layer_ab.py --part preamble --shape dsv3 --dtype bf16 --m 32,64 --rounds 3 \
  --variant e128k64w4:$P.ROUTER_WIDE_BLOCK_E=128,$P.ROUTER_WIDE_BLOCK_K=64,$P.ROUTER_WIDE_WARPS=4 \
  --variant e64k128w8:$P.ROUTER_WIDE_BLOCK_E=64,$P.ROUTER_WIDE_BLOCK_K=128,$P.ROUTER_WIDE_WARPS=8 \
  --variant e128k128w8:$P.ROUTER_WIDE_BLOCK_E=128,$P.ROUTER_WIDE_BLOCK_K=128,$P.ROUTER_WIDE_WARPS=8 \
  --variant e64k64w4:$P.ROUTER_WIDE_BLOCK_E=64,$P.ROUTER_WIDE_BLOCK_K=64,$P.ROUTER_WIDE_WARPS=4 \
  --variant e128k64w8:$P.ROUTER_WIDE_BLOCK_E=128,$P.ROUTER_WIDE_BLOCK_K=64,$P.ROUTER_WIDE_WARPS=8 \
  2>&1 | tee "$OUT/router_wide_tile_ab.txt"
for s in 0 1; do
  MOE_FUSION_SHARED_FP8=$s timeout -k 5 100 python -m moe_fusion.tools.bench --shape dsv3-ep8 --dtype fp8 --parts layer \
    --m 1,2,4 --variants moe_fusion --json "$W/layer_shared_fp8_$s.json" --markdown "$OUT/layer_shared_fp8_$s.md" \
    >"$W/layer_$s.log" 2>&1
  echo "layer bench shared_fp8=$s: exit $?"; grep "^| dsv3" "$OUT/layer_shared_fp8_$s.md"
done
timeout -k 5 90 python benchmarks/gpu_overlap.py --out "$W" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 2>&1 | tail -n 12
MOE_FUSION_RANDOM_SCALE=5 timeout -k 5 120 python -m pytest -q -p no:cacheprovider tests/test_random_preamble.py \
  >"$OUT/random_preamble_tests.log" 2>&1
echo "random preamble tests: exit $?"; tail -n 2 "$OUT/random_preamble_tests.log"
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
