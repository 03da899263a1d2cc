#!/usr/bin/env bash
# Session 34, call 3 (H100; moe_fusion/ as at 93e58c9, run twice: call3/). The fp8 shared expert and the preamble
# on disjoint SMs (green contexts): does the shared expert still pay ~2.5-3 µs beside the routing when the two share
# only HBM and L2? See probe_green_partition.py's docstring. H100; dsv3-ep8, fp8 experts, fp8 shared expert.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python -c 'import torch, triton; print("torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__)'
git apply benchmarks/results/s33_experiments/gemm1_after_norm_pdl_prefetch.patch || exit 1  # the device's copy only
P=benchmarks/results/s34_experiments/probe_green_partition.py
timeout -k 5 400 python $P --m 1,4 --sms 128,112 2>&1 | grep -v -i warn | tail -24
