#!/usr/bin/env bash
# Session 34, call 1 (H100; moe_fusion/ as at 93e58c9: session 32's library, fused_preamble split in two): issue 6's first must-show
# re-measured on the current code. The dsv3 layer, bf16 and fp8 experts, M = 1 ... 64, beside eager and Inductor of
# the same module: >= 90% of the floor at every M, <= 0.8x Inductor at M <= 4. Last measured in session 17 (cc75b70),
# before the side stream stopped running cuBLAS and before sessions 18-31's kernel and plan changes.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name())'
for dt in bf16 fp8; do
  timeout -k 5 285 python -m moe_fusion.tools.bench --shape dsv3 --parts layer --m 1,2,4,8,16,32,64 --dtype $dt \
    --variants eager,inductor,moe_fusion --variant-budget 25 --markdown "$OUT/dsv3_layer_$dt.md" --json "$OUT/dsv3_layer_$dt.json" \
    > "$OUT/dsv3_layer_$dt.log" 2>&1; echo "$dt exit $?"; grep "^| dsv3" "$OUT/dsv3_layer_$dt.md"
done
