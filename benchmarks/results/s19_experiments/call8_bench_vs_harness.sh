#!/usr/bin/env bash
# Session 19, call 8: the final code's dsv3-ep8 fp8 layer (fp8 shared expert, the plan: stream-late at M = 1 and 4)
# timed by `moe-fusion bench` itself (one process per seed, as session 18 did) and by gpu_shared_strategies.py
# (call 7's harness) on the same machine and seeds, to tell a difference of tools from one of machines
# (session 18's bench read 46.0 µs at M = 1 where call 7's harness read 48.6 for the same code and seeds).
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SEEDS="0 1 2 3 4 5"
start=$SECONDS
for seed in $SEEDS; do
  [ $((SECONDS - start)) -gt 200 ] && break
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 80 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,4 \
    --dtype fp8 --variants moe_fusion --sets 32 --seed $seed --json "$OUT/bench_seed$seed.json" --markdown /tmp/s$seed.md \
    > /dev/null 2>&1
  echo "seed $seed ($((SECONDS - start)) s)"; grep "^| dsv3" /tmp/s$seed.md
done | tee "$OUT/bench.txt"
timeout -k 5 100 python benchmarks/gpu_shared_strategies.py --out "$OUT" --shapes dsv3-ep8 --dtypes fp8 --m 1,4 \
  --seeds $(echo $SEEDS | tr ' ' ,) --sets 32 --strategies stream-late > "$OUT/harness.txt" 2>&1
python benchmarks/routing_seeds.py "$OUT"/bench_seed*.json | tail -n 2
python benchmarks/routing_seeds.py "$OUT/shared_strategies.json" | grep -- "-fp8 |"
