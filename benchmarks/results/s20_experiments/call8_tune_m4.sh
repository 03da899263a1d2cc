#!/usr/bin/env bash
# Session 20, call 8: the tuner with the 4-way GEMM1 split among its M = 4 candidates (tune_experts: split K
# up to two waves of 2 programs per SM), dsv3-ep8 fp8 M = 4, 32 routings. Then by hit count, seeds 0 and 1,
# 2 rounds: the table, the tuned table and call 7's hand-made split 4. Then the layer's GPU tests of the
# stream-late plan on the tuned table (the copy of the tree here only).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
cp moe_fusion/lowering/expert_configs.json /tmp/tuned.json
timeout -k 5 120 python -m moe_fusion.lowering.tune_experts --shapes dsv3-ep8 --dtypes fp8 --m 4 --sets 32 \
  --out /tmp/tuned.json > "$OUT/tune_m4.txt" 2>&1
grep -- "->" "$OUT/tune_m4.txt"; cp /tmp/tuned.json "$OUT/tuned.json"
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev, ROUTED = "NVIDIA H100 80GB HBM3", "fp8-H7168-I2048-E32of256-k8"
t = copy.deepcopy(base)
t[dev][ROUTED]["4"]["gemm1"].update(split_k=4)
json.dump(t, open("/tmp/r4-g1-split4.json", "w"))
PY
MOE_FUSION_SHARED_FP8=1 timeout -k 5 200 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0,1 \
  --rounds 2 --variant plan: --variant tuned:expert_configs.TABLE_PATH=/tmp/tuned.json \
  --variant r4-g1-split4:expert_configs.TABLE_PATH=/tmp/r4-g1-split4.json > "$OUT/log.txt" 2>&1
tail -1 "$OUT/log.txt"
cp /tmp/tuned.json moe_fusion/lowering/expert_configs.json
timeout -k 5 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_layer.py -k "late" 2>&1 | tail -n 3
