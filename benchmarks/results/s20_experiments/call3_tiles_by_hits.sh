#!/usr/bin/env bash
# Session 20, call 3: tile changes of the dsv3-ep8 fp8 layer (fp8 shared expert, the plan's stream-late), each
# timed by hit count (gpu_layer_by_hits.py, seed 0) so that the summary weights them by the routing the layer
# should expect. Each variant reads a copy of the tile table with one change at M = 1 or 4.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev = "NVIDIA H100 80GB HBM3"
ROUTED, SHARED = "fp8-H7168-I2048-E32of256-k8", "fp8-H7168-I2048-E1of1-k1"
changes = {  # name: (key, M, gemm, fields)
    "r4-g1-bn32": (ROUTED, "4", "gemm1", dict(block_n=32)),
    "r4-g1-split1": (ROUTED, "4", "gemm1", dict(split_k=1)),
    "r4-g1-split4": (ROUTED, "4", "gemm1", dict(split_k=4)),
    "r4-g2-split4": (ROUTED, "4", "gemm2", dict(split_k=4)),
    "r4-g2-bk128": (ROUTED, "4", "gemm2", dict(block_k=128, num_stages=4)),
    "s4-g1-pps1": (SHARED, "4", "gemm1", dict(programs_per_sm=1)),
    "s1-g1-pps2": (SHARED, "1", "gemm1", dict(programs_per_sm=2)),
    "s1-g1-split8": (SHARED, "1", "gemm1", dict(split_k=8, programs_per_sm=2)),
    "s1-g2-split4": (SHARED, "1", "gemm2", dict(split_k=4)),
    "r1-g2-split2": (ROUTED, "1", "gemm2", dict(split_k=2)),
}
for name, (key, m, gemm, fields) in changes.items():
    t = copy.deepcopy(base)
    t[dev][key][m][gemm].update(fields)
    json.dump(t, open(f"/tmp/{name}.json", "w"))
print(" ".join(changes))
PY
VARIANTS=(--variant plan:)
for v in r4-g1-bn32 r4-g1-split1 r4-g1-split4 r4-g2-split4 r4-g2-bk128 s4-g1-pps1 s1-g1-pps2 s1-g1-split8 \
         s1-g2-split4 r1-g2-split2; do
  VARIANTS+=(--variant "$v:expert_configs.TABLE_PATH=/tmp/$v.json")
done
timeout -k 5 400 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0 "${VARIANTS[@]}" 2>&1 \
  | grep -v -i warn
