#!/usr/bin/env bash
# Session 19, call 6: (1) the GPU tests of "stream-late" (the layer eager and under CUDA graphs, fp8 and bf16 shared
# expert); (2) the shared-expert strategies of the dsv3-ep8 fp8 layer at M = 1, 2, 4, 8 over bench seeds 0-3
# (32 input sets each), the rows shared_plan.json's entries are regenerated from; (3) the tile tuner at dsv3-ep8
# fp8 M = 1 with 32 routings per timing instead of 4 (in the layer, GEMM1 at 2 programs per SM was 0.5 µs faster
# than the table's 1, call 5), into a copy of the table.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 170 python -m pytest -q -p no:cacheprovider -m gpu tests/test_layer.py tests/test_shared_plan.py -k "late" \
  2>&1 | tail -n 5 | tee "$OUT/tests.txt"
timeout -k 5 230 python benchmarks/gpu_shared_strategies.py --out "$OUT" --shapes dsv3-ep8 --dtypes fp8 --m 1,2,4,8 \
  --seeds 0,1,2,3 --sets 32 --strategies stream,stream-late,fused > "$OUT/strategies.txt" 2>&1
python -m moe_fusion.lowering.shared_plan --from-json "$OUT/shared_strategies.json" | tee "$OUT/plan.txt"
cp moe_fusion/lowering/expert_configs.json /tmp/tuned.json
timeout -k 5 170 python -m moe_fusion.lowering.tune_experts --shapes dsv3-ep8 --dtypes fp8 --m 1 --sets 32 \
  --out /tmp/tuned.json > "$OUT/tune.txt" 2>&1
grep -- "->\|block_m 16:" "$OUT/tune.txt"; cp /tmp/tuned.json "$OUT/tuned.json"
