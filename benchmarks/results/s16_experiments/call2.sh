#!/usr/bin/env bash
# Session 16, call 2, from the repository root: the final runs of issues 4 and 5 on one machine.
#  1. the bench's preamble part, every shape, eager / Inductor of the reference / moe_fusion, M = 1..64 (issue 4);
#  2. gpu_experts.py: the expert kernels at real shapes against the reference (checks), then the block's time and
#     fraction of copy bandwidth beside torch._grouped_mm and eager / Inductor of the reference, every shape,
#     bf16 and fp8, and a kernel profile at M = 1 and 64 (issue 5);
#  3. gpu_preamble.py, dsv3: the two-launch path (norm + one-launch router / routing / alignment) beside the planned one (issue 4).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 220 python -m moe_fusion.tools.bench --shape dsv3,dsv3-ep8,qwen3-30b-a3b,mixtral --parts preamble \
  --m 1,2,4,8,16,32,64 --variants eager,inductor,moe_fusion --variant-budget 40 \
  --json "$OUT/preamble_final.json" --markdown "$OUT/preamble_final.md" >"$OUT/preamble_final.log" 2>&1
echo "preamble bench: exit $?"; grep "^| " "$OUT/preamble_final.md" | cut -c1-150
timeout -k 5 260 python benchmarks/gpu_experts.py --check --check-m 1,5,64 --bench --baselines --profile \
  --out "$OUT" >"$OUT/experts_final.log" 2>&1
echo "experts: exit $?"; sed -n '/== expert block/,$p' "$OUT/experts_final.log"
timeout -k 5 60 python benchmarks/gpu_preamble.py --skip-tests --no-baselines --shapes dsv3 --budget-s 50 \
  --out "$OUT" >"$OUT/preamble_two_launch.log" 2>&1
echo "two-launch: exit $?"; tail -n 12 "$OUT/preamble_two_launch.log"
