#!/usr/bin/env bash
# Session 26, call 1: what the launch between the shared expert's GEMMs costs at dsv3-ep8 fp8 M = 1 (fp8 shared
# expert), by hit count, before building a GEMM2 that takes h as GEMM1 writes it:
#   plan            the table (shared GEMM1 split 4, gemm1_combine_kernel makes fp8 h)
#   s1_bk256/512    shared GEMM1 unsplit (block_n 16, 128 programs), h quantised by fp8_act_quant_kernel
#   *_noh           the same with the launch that makes h left out (probe patch: GEMM2 reads a stale h, so
#                   only the timing means anything): the most a GEMM2 reading GEMM1's h directly could save
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=benchmarks/results/s26_experiments
git apply "$D/probe_skip_shared_h_launch.patch" || exit 1
T256="expert_configs.TABLE_PATH='$D/table_shared_m1_gemm1_split1_bk256.json'"
T512="expert_configs.TABLE_PATH='$D/table_shared_m1_gemm1_split1_bk512.json'"
MOE_FUSION_SHARED_FP8=1 timeout -k 5 330 python benchmarks/gpu_layer_by_hits.py --out "$OUT/ab" --m 1 --seeds 0 \
  --rounds 2 --variant plan: --variant "s1_bk256:$T256" --variant "s1_bk512:$T512" \
  --variant "plan_noh:shared_expert.SKIP_H_PROBE=True" --variant "s1_bk256_noh:$T256,shared_expert.SKIP_H_PROBE=True" \
  --profile-hits 0 > "$OUT/ab.log" 2>&1
echo "ab rc=$?"
git apply -R "$D/probe_skip_shared_h_launch.patch"
python benchmarks/gpu_layer_by_hits.py --summarize "$OUT/ab/by_hits.json" | tail -7
grep -A14 "one call's kernels" "$OUT/ab.log" | head -90
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
