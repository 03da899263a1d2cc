#!/usr/bin/env bash
# Session 17, call 6 (H100; moe_fusion/ as committed at cc75b70): the dsv3 layer, bf16 and fp8 experts, M = 1 ... 64,
# beside eager and Inductor of the same module (issue 6: >= 90% of the floor, <= 0.8x Inductor at M <= 4).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for dt in bf16 fp8; do
  timeout -k 5 270 python -m moe_fusion.tools.bench --shape dsv3 --parts layer --m 1,2,4,8,16,32,64 --dtype $dt \
    --variants eager,inductor,moe_fusion --variant-budget 25 --markdown "$OUT/dsv3_layer_$dt.md" --json "$OUT/dsv3_layer_$dt.json" \
    > "$OUT/dsv3_layer_$dt.log" 2>&1; echo "$dt exit $?"; grep "^| dsv3" "$OUT/dsv3_layer_$dt.md"
done
