#!/usr/bin/env bash
# Session 20, call 10: the routed and the shared GEMM2 run at once (stream-late), each with a grid sized to fill the
# GPU alone (2 programs per SM). A/B by hit count, seed 0, 2 rounds: either one at 1 program per SM at M = 1 and 4.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev = "NVIDIA H100 80GB HBM3"
for name, key in {"r-g2-pps1": "fp8-H7168-I2048-E32of256-k8", "s-g2-pps1": "fp8-H7168-I2048-E1of1-k1"}.items():
    t = copy.deepcopy(base)
    for m in ("1", "4"):
        t[dev][key][m]["gemm2"].update(programs_per_sm=1)
    json.dump(t, open(f"/tmp/{name}.json", "w"))
PY
timeout -k 5 250 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0 --rounds 2 \
  --variant plan: --variant r-g2-pps1:expert_configs.TABLE_PATH=/tmp/r-g2-pps1.json \
  --variant s-g2-pps1:expert_configs.TABLE_PATH=/tmp/s-g2-pps1.json > "$OUT/log.txt" 2>&1
tail -1 "$OUT/log.txt"
