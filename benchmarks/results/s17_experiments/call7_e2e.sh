#!/usr/bin/env bash
# Session 17, call 7 (H100; moe_fusion/ as committed at cc75b70; the GPU image's transformers): the HF DeepSeek-V3-style
# decode step, real sizes (2 layers, bf16) at batch 1, 4, 16, then the tiny config in fp32 (greedy tokens vs eager).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python -c "import transformers; print('transformers', transformers.__version__)"
timeout -k 5 330 python benchmarks/e2e_decode.py --config real --layers 2 --batch 1,4,16 --json "$OUT/e2e_real2_bf16.json" \
  > "$OUT/e2e_real2_bf16.md" 2> "$OUT/e2e_real2_bf16.log"; echo "real exit $?"; cat "$OUT/e2e_real2_bf16.md"
timeout -k 5 150 python benchmarks/e2e_decode.py --config tiny --layers 2 --dtype float32 --mode default --batch 1,4,16 \
  --json "$OUT/e2e_tiny2_fp32.json" > "$OUT/e2e_tiny2_fp32.md" 2> "$OUT/e2e_tiny2_fp32.log"; echo "tiny exit $?"; cat "$OUT/e2e_tiny2_fp32.md"
