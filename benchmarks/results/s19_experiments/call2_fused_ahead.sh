#!/usr/bin/env bash
# Session 19, call 2: the "fused-ahead" shared-expert strategy (the first GEMM1 K splits of the fused
# shared tail on the side stream beside the routing chain) against "stream" and "fused", dsv3-ep8 fp8,
# fp8 shared expert, in one process over 32 routers (expected routing). At M = 4 the table's GEMM1 has
# 2 splits; variants "*-s4" read a copy of the table whose M = 4 entry splits GEMM1 4 ways.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python - <<'PY'
import json
t = json.load(open("moe_fusion/lowering/expert_configs.json"))
e = t["NVIDIA H100 80GB HBM3"]["fp8-H7168-I2048-E32of256-k8"]
e["4"]["gemm1"]["split_k"] = 4
json.dump(t, open("/tmp/split4.json", "w"))
PY
FP8=layer.options.shared_fp8=True
S4=expert_configs.TABLE_PATH=/tmp/split4.json
timeout -k 5 330 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 --router-seeds 32 \
  --variant stream:$FP8,layer.options.shared_expert=stream \
  --variant fused:$FP8,layer.options.shared_expert=fused \
  --variant ahead1:$FP8,layer.options.shared_expert=fused-ahead,layer.options.shared_ahead_splits=1 \
  --variant ahead2:$FP8,layer.options.shared_expert=fused-ahead,layer.options.shared_ahead_splits=2 \
  --variant ahead3:$FP8,layer.options.shared_expert=fused-ahead,layer.options.shared_ahead_splits=3 \
  --variant fused-s4:$FP8,layer.options.shared_expert=fused,$S4 \
  --variant ahead2-s4:$FP8,layer.options.shared_expert=fused-ahead,layer.options.shared_ahead_splits=2,$S4 \
  --variant ahead3-s4:$FP8,layer.options.shared_expert=fused-ahead,layer.options.shared_ahead_splits=3,$S4 \
  2>&1 | tee "$OUT/ahead_ab.txt" | tail -n 12
timeout -k 5 200 python -m pytest -q -x -p no:cacheprovider tests/test_layer.py tests/test_expert_kernels.py \
  -k "ahead" 2>&1 | tail -n 8 | tee "$OUT/ahead_tests.txt"
