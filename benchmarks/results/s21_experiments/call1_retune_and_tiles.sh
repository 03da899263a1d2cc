#!/usr/bin/env bash
# Session 21, call 1: session 20's prepared retune (the tuner now routes as DeepSeek does) of dsv3-ep8 fp8 at
# M = 1 and 4, then an A/B by hit count (fp8 shared expert, seed 0, 3 rounds alternated) of the table against:
#   grouped     the retuned table;
#   s1-g1-pps2  the shared expert's M = 1 GEMM1 at 2 programs per SM: its 256 items (64 column blocks x split 4)
#               then take one program each, all resident at once, as session 13's stream probe read 29 MB
#               (12.1 us) -- the table's 1 program per SM gives each program two items one after the other;
#   s1-g1-bk256 the same with block_k 256 and 3 stages (the probe's tiles: 96 KB in flight per program);
#   r4-g1-split4 the routed M = 4 GEMM1 split 4 (session 20: -0.1 to -0.8 us in three calls); at M = 1 it is the
#               table, so its M = 1 rows show the noise;
#   r4-g1-cap5  the same with max_waves 5 (new: the split halves on the device where the hit experts' items would
#               pass 5 waves, i.e. split 4 up to 5 experts, 2 from 6: session 20's calls 3, 7, 8 had split 4 ahead
#               at h <= 5 and behind at h >= 6).
# First the capped split's kernel test on CUDA (GEMM1 and the combine agree on the split the device chose).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 90 python -m pytest -q tests/test_expert_kernels.py -k capped 2>&1 | tail -2
cp moe_fusion/lowering/expert_configs.json /tmp/grouped.json
timeout -k 5 170 python -m moe_fusion.lowering.tune_experts --shapes dsv3-ep8 --dtypes fp8 --m 1,4 --sets 32 \
  --out /tmp/grouped.json > "$OUT/tune.txt" 2>&1
grep -- "->" "$OUT/tune.txt"; cp /tmp/grouped.json "$OUT/tuned.json"
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev, SHARED, ROUTED = "NVIDIA H100 80GB HBM3", "fp8-H7168-I2048-E1of1-k1", "fp8-H7168-I2048-E32of256-k8"
changes = {
    "s1-g1-pps2": (SHARED, "1", "gemm1", dict(programs_per_sm=2)),
    "s1-g1-bk256": (SHARED, "1", "gemm1", dict(programs_per_sm=2, block_k=256, num_stages=3)),
    "r4-g1-split4": (ROUTED, "4", "gemm1", dict(split_k=4)),
    "r4-g1-cap5": (ROUTED, "4", "gemm1", dict(split_k=4, max_waves=5)),
}
for name, (key, m, gemm, fields) in changes.items():
    t = copy.deepcopy(base)
    t[dev][key][m][gemm].update(fields)
    json.dump(t, open(f"/tmp/{name}.json", "w"))
PY
VARIANTS=(--variant plan: --variant grouped:expert_configs.TABLE_PATH=/tmp/grouped.json)
for v in s1-g1-pps2 s1-g1-bk256 r4-g1-split4 r4-g1-cap5; do
  VARIANTS+=(--variant "$v:expert_configs.TABLE_PATH=/tmp/$v.json")
done
MOE_FUSION_SHARED_FP8=1 timeout -k 5 300 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0 \
  --rounds 3 --profile-hits 0,3 "${VARIANTS[@]}" > "$OUT/log.txt" 2>&1
tail -2 "$OUT/log.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv
