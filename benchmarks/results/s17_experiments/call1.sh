#!/usr/bin/env bash
# Session 17, calls 1 (it came on an H200) and 2 (H100), from the repository root (issue 6, the overlap's measuring method):
#  1-2. gpu_overlap.py, dsv3-ep8 fp8 experts, fp8 shared expert, M = 1, 4: each input set with its own
#       copy of the preamble and shared-expert weights (default), then over one copy (sessions 3-16);
#  3.   the same for the bf16 shared expert on cuBLAS, bf16 and fp8 experts, weights rotated;
#  4.   the bench's dsv3-ep8 fp8 layer with the fp8 shared expert, M = 1 ... 64 (call 1: M = 1, 2, 4).
set -u
OUT=${OUT:-benchmarks/out}
W=$OUT/w; mkdir -p "$W"/rot "$W"/one "$W"/cublas
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 110 python benchmarks/gpu_overlap.py --out "$W/rot" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 2>&1 | grep "^\[overlap\]"
timeout -k 5 100 python benchmarks/gpu_overlap.py --out "$W/one" --m 1,4 --dtypes fp8 --shared-on kernels-fp8 --weight-copies 1 2>&1 | grep "^\[overlap\]"
timeout -k 5 170 python benchmarks/gpu_overlap.py --out "$W/cublas" --m 1,4 --dtypes bf16,fp8 > "$W/cublas.log" 2>&1; echo "cublas $?"
grep "^\[overlap\]" "$W/cublas.log"; grep -B2 -A12 Traceback "$W/cublas.log" | tail -n 30
for d in rot one cublas; do cp "$W/$d/overlap.md" "$OUT/overlap_$d.md" 2>/dev/null; done
MOE_FUSION_SHARED_FP8=1 timeout -k 5 100 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,2,4,8,16,32,64 --dtype fp8 \
  --variants moe_fusion --markdown "$OUT/ep8_fp8_layer.md" > "$W/ep8_bench.log" 2>&1; echo "bench $?"; grep "^| dsv3" "$OUT/ep8_fp8_layer.md"
tar czf "$OUT/work.tgz" -C "$W" . && rm -rf "$W"
for d in rot one cublas; do sed -n '3,9p' "$OUT/overlap_$d.md"; done
