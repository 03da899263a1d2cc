#!/usr/bin/env bash
# Session 14, call 2 (H100), from the repository root:
#  1. the bench's layer part, dsv3-ep8 fp8, M = 1, 2, 4, shared expert in bf16 and in fp8 (issue 6);
#  2. gpu_overlap.py, dsv3-ep8 fp8 with the fp8 shared expert (issue 6).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
for s in 0 1; do
  MOE_FUSION_SHARED_FP8=$s timeout -k 5 100 python -m moe_fusion.tools.bench --shape dsv3-ep8 --dtype fp8 --parts layer --m 1,2,4 \
    --variants moe_fusion --json "$W/layer_shared_fp8_$s.json" --markdown "$OUT/layer_shared_fp8_$s.md" >"$W/layer_$s.log" 2>&1
  echo "layer bench shared_fp8=$s: exit $?"; grep "^| dsv3" "$OUT/layer_shared_fp8_$s.md"
done
timeout -k 5 100 python benchmarks/gpu_overlap.py --out "$W" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 2>&1 | tail -20
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
