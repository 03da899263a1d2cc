#!/usr/bin/env bash
# Written in session 17, NOT run (no device time was left): what the side-stream change (5cc8cfc) still needs on the H100.
#  1. the GPU tests of the layer, the shared expert and the plan, one process (with -n 8 the real-size layers ran
#     the GPU out of memory in call 12);
#  2. the layer at the points where the plan table says "stream" (now the expert kernels on the side stream):
#     dsv3 fp8 experts M = 1, 8; dsv3 bf16 M = 64; dsv3-ep8 fp8 M = 4, 8, 16, 64; dsv3-ep8 bf16 M = 64;
#  3. the overlap, default (bf16 shared expert on the kernels), three runs: 1.081 / 1.100 and 1.090 / 1.099 in call 12.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_shared_expert.py tests/test_shared_plan.py \
  tests/test_layer.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?"; tail -n 3 "$OUT/gpu_tests.log"
timeout -k 5 120 python -m moe_fusion.tools.bench --shape dsv3 --parts layer --m 1,8 --dtype fp8 --variants moe_fusion \
  --markdown "$OUT/dsv3_fp8.md" > /dev/null 2>&1; grep "^| dsv3" "$OUT/dsv3_fp8.md"
timeout -k 5 120 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 4,8,16,64 --dtype fp8 --variants moe_fusion \
  --markdown "$OUT/ep8_fp8.md" > /dev/null 2>&1; grep "^| dsv3" "$OUT/ep8_fp8.md"
timeout -k 5 120 python -m moe_fusion.tools.bench --shape dsv3,dsv3-ep8 --parts layer --m 64 --dtype bf16 --variants moe_fusion \
  --markdown "$OUT/bf16_64.md" > /dev/null 2>&1; grep "^| dsv3" "$OUT/bf16_64.md"
for i in 1 2 3; do
  timeout -k 5 70 python benchmarks/gpu_overlap.py --out /tmp/o$i --m 1,4 --dtypes bf16,fp8 2>&1 | grep "^\[overlap\]" | sed -E "s/\{[^}]*\}//"
done
