#!/usr/bin/env bash
# Session 20, call 6: the GEMM2 phase reads at ~2 TB/s in call 5's timelines (the shared GEMM2 alone at 0 hits at
# 1.7). A/B by hit count, 3 rounds alternated, seed 0: GEMM2 placed early and pulling its first weights into L2
# (EXPERT_PDL=h+gemm2, 64 KB and 128 KB a program), and the shared expert's M = 1 GEMM2 with more weight bytes in
# flight per program (block_k 256 / 6 stages).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_FUSION_SHARED_FP8=1
python - <<'PY'
import copy, json
base = json.load(open("moe_fusion/lowering/expert_configs.json"))
dev, SHARED = "NVIDIA H100 80GB HBM3", "fp8-H7168-I2048-E1of1-k1"
for name, fields in {"s1-g2-bk256": dict(block_k=256, num_stages=3), "s1-g2-st6": dict(num_stages=6)}.items():
    t = copy.deepcopy(base)
    t[dev][SHARED]["1"]["gemm2"].update(fields)
    json.dump(t, open(f"/tmp/{name}.json", "w"))
PY
timeout -k 5 400 python benchmarks/gpu_layer_by_hits.py --out "$OUT/hits" --m 1,4 --seeds 0 --rounds 3 \
  --variant plan: --variant h2g:experts.EXPERT_PDL=h+gemm2 \
  --variant h2g128k:experts.EXPERT_PDL=h+gemm2,experts.PREFETCH_BYTES=131072 \
  --variant s1-g2-bk256:expert_configs.TABLE_PATH=/tmp/s1-g2-bk256.json \
  --variant s1-g2-st6:expert_configs.TABLE_PATH=/tmp/s1-g2-st6.json > "$OUT/log.txt" 2>&1
tail -3 "$OUT/log.txt"
