#!/usr/bin/env bash
# Session 19, call 5: the expert tiles inside the layer (they were tuned per GEMM, alone). dsv3-ep8 fp8, fp8 shared
# expert on the side stream with its GEMM2 after the routed GEMM1 ("late"), M = 1 / 4, in one process over 32
# routers. Each variant reads a copy of the tile table with one change to the routed (E32of256) or the shared
# (E1of1) entries at M = 1 and 4.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev = "NVIDIA H100 80GB HBM3"
ROUTED, SHARED = "fp8-H7168-I2048-E32of256-k8", "fp8-H7168-I2048-E1of1-k1"
changes = {  # name: (key, gemm, {M: {field: value}})
    "r-g1-split": (ROUTED, "gemm1", {"1": dict(split_k=2, programs_per_sm=2), "4": dict(split_k=4, programs_per_sm=1)}),
    "r-g1-pps": (ROUTED, "gemm1", {"1": dict(programs_per_sm=2), "4": dict(programs_per_sm=1)}),
    "r-g2-split1": (ROUTED, "gemm2", {"1": dict(split_k=1), "4": dict(split_k=1)}),
    "r-g2-bn": (ROUTED, "gemm2", {"1": dict(block_n=128), "4": dict(block_n=64)}),
    "s-g1-bn32": (SHARED, "gemm1", {"1": dict(block_n=32), "4": dict(block_n=32)}),
    "s-g1-split2": (SHARED, "gemm1", {"1": dict(split_k=2, programs_per_sm=2), "4": dict(split_k=2)}),
    "s-g1-pps": (SHARED, "gemm1", {"1": dict(programs_per_sm=2), "4": dict(programs_per_sm=1)}),
    "s-g2-bn128": (SHARED, "gemm2", {"1": dict(block_n=128), "4": dict(block_n=128)}),
}
for name, (key, gemm, by_m) in changes.items():
    t = copy.deepcopy(base)
    for m, fields in by_m.items():
        t[dev][key][m][gemm].update(fields)
    json.dump(t, open(f"/tmp/{name}.json", "w"))
print(" ".join(changes))
PY
BASE=layer.options.shared_expert=stream,layer.options.shared_fp8=True,layer.options.shared_gemm2_late=True
VARIANTS=(--variant base:$BASE)
for v in r-g1-split r-g1-pps r-g2-split1 r-g2-bn s-g1-bn32 s-g1-split2 s-g1-pps s-g2-bn128; do
  VARIANTS+=(--variant "$v:$BASE,expert_configs.TABLE_PATH=/tmp/$v.json")
done
timeout -k 5 400 python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,4 --rounds 3 --router-seeds 32 \
  "${VARIANTS[@]}" 2>&1 | tee "$OUT/tiles_ab.txt" | tail -n 10
