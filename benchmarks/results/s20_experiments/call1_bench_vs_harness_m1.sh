#!/usr/bin/env bash
# Written in session 19, not run (no device time was left). Why does gpu_shared_strategies.py read the dsv3-ep8
# fp8 layer 3.3-4.4 µs slower at M = 1 than `moe-fusion bench` on the same machine and seeds, while M = 4 agrees
# (session19.md part 5)? One machine, seeds 0-2, fp8 shared expert, each difference between the tools alone:
#   bench:        moe-fusion bench, a process per seed (the reference)
#   script:       gpu_shared_strategies.py as in calls 7-8 (bf16 shared expert timed first, 0.15 s per point)
#   fp8-only:     the script timing only the fp8 shared expert
#   no-grad:      the script under torch.no_grad(), as the bench measures
#   0.25 s:       the script with the bench's --seconds-per-point
# About 3 minutes on the H100.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for seed in 0 1 2; do
  MOE_FUSION_SHARED_FP8=1 timeout -k 5 80 python -m moe_fusion.tools.bench --shape dsv3-ep8 --parts layer --m 1,4 \
    --dtype fp8 --variants moe_fusion --sets 32 --seed $seed --json "$OUT/bench_seed$seed.json" --markdown /tmp/s$seed.md \
    > /dev/null 2>&1
  echo "bench seed $seed"; grep "^| dsv3" /tmp/s$seed.md
done
script() {  # NAME, context manager, extra args, setup statement
  RESULT_TAG=_$1 timeout -k 5 100 python -c "
import sys, contextlib, torch; sys.path.insert(0, 'benchmarks')
import gpu_shared_strategies
${4:-pass}
with $2:
    gpu_shared_strategies.main(['--out', '$OUT', '--shapes', 'dsv3-ep8', '--dtypes', 'fp8', '--m', '1,4', '--seeds', '0,1,2',
                                '--sets', '32'] + '$3'.split())" 2>&1 | grep "fp8 " | sed "s/^/$1: /"
}
script script "contextlib.nullcontext()" "--strategies stream-late"
script fp8-only "contextlib.nullcontext()" "--strategies stream-late" \
  "gpu_shared_strategies._variants = lambda fp8, names: [(n + '-fp8', n, True) for n in names]"
script no-grad "torch.no_grad()" "--strategies stream-late"
script slow "contextlib.nullcontext()" "--strategies stream-late --seconds-per-point 0.25"
