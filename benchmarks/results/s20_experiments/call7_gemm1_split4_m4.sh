#!/usr/bin/env bash
# Session 20, call 7: the routed GEMM1 at M = 4 split 4 ways (256 items per expert against the H100's 264
# program slots at 2 per SM, so every hit count fills whole waves; the table's split 2 gives 128 per expert).
# Call 3 read it 1-2.7 µs faster at most hit counts, one timing each. Here 4 rounds alternated, seeds 0 and 1.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev, ROUTED = "NVIDIA H100 80GB HBM3", "fp8-H7168-I2048-E32of256-k8"
t = copy.deepcopy(base)
t[dev][ROUTED]["4"]["gemm1"].update(split_k=4)
json.dump(t, open("/tmp/r4-g1-split4.json", "w"))
PY
timeout -k 5 400 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 4 --seeds 0,1 --rounds 4 \
  --variant plan: --variant r4-g1-split4:expert_configs.TABLE_PATH=/tmp/r4-g1-split4.json > "$OUT/log.txt" 2>&1
tail -2 "$OUT/log.txt"
