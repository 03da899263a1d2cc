#!/usr/bin/env bash
# Session 17, call 12 (H100): after "the side stream runs the shared expert on the expert kernels only": the GPU tests
# of the layer, the shared expert and the plan, then gpu_overlap.py's default (bf16 shared expert on the kernels),
# bf16 and fp8 experts, the command that had stopped on illegal addresses with cuBLAS on the side stream.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 90 python -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/test_shared_expert.py tests/test_shared_plan.py \
  tests/test_layer.py 2>&1 | tail -n 4
timeout -k 5 60 python benchmarks/gpu_overlap.py --out /tmp/o --m 1,4 --dtypes bf16,fp8 2>&1 | grep "^\[overlap\]\|rror" | cut -c1-330
