#!/usr/bin/env bash
# Session 34, call 2 (H100; moe_fusion/ as at 93e58c9; transformers 5.23 from the carried wheel, CI's version):
# issue 6's HF decode step re-measured on the current code. Real sizes (2 layers, bf16) at batch 1, 4, 16, then the
# tiny config in fp32 (greedy tokens vs eager). Last measured in session 17 (cc75b70) with transformers 5.17.
# The wheel, fetched here (its needs are on the GPU image: huggingface_hub, tokenizers, safetensors) and carried as .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.23.0
set -u
OUT=${OUT:-benchmarks/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python -c "import torch, transformers; print('transformers', transformers.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())"
timeout -k 5 330 python benchmarks/e2e_decode.py --config real --layers 2 --batch 1,4,16 --json "$OUT/e2e_real2_bf16.json" \
  > "$OUT/e2e_real2_bf16.md" 2> "$OUT/e2e_real2_bf16.log"; echo "real exit $?"; cat "$OUT/e2e_real2_bf16.md"
timeout -k 5 150 python benchmarks/e2e_decode.py --config tiny --layers 2 --dtype float32 --mode default --batch 1,4,16 \
  --json "$OUT/e2e_tiny2_fp32.json" > "$OUT/e2e_tiny2_fp32.md" 2> "$OUT/e2e_tiny2_fp32.log"; echo "tiny exit $?"; cat "$OUT/e2e_tiny2_fp32.md"
