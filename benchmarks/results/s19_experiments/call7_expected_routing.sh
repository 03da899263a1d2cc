#!/usr/bin/env bash
# Session 19, call 7: the dsv3-ep8 fp8 layer (fp8 shared expert) at the routing it should expect, bench method
# (gpu_shared_strategies.py: moe-fusion bench's weights, inputs and timing), bench seeds 0-13, 32 input sets
# each, M = 1 and 4, "stream" and "stream-late":
#   new: this session's tile table (M = 1 retuned with 32 routings, call 6) with M = 4 retuned the same way here;
#   s18: session 18's table (session18_expert_configs.json), the baseline on the same machine.
# benchmarks/routing_seeds.py fits each; then the GPU tests of stream-late on the new M = 1 tiles.
set -u
OUT=${OUT:-benchmarks/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SEEDS=0,1,2,3,4,5,6,7,8,9,10,11,12,13
cp moe_fusion/lowering/expert_configs.json /tmp/new.json
timeout -k 5 110 python -m moe_fusion.lowering.tune_experts --shapes dsv3-ep8 --dtypes fp8 --m 4 --sets 32 \
  --out /tmp/new.json > "$OUT/tune_m4.txt" 2>&1
grep -- "->" "$OUT/tune_m4.txt"; cp /tmp/new.json "$OUT/tuned.json"
for table in new s18; do
  path=/tmp/new.json; [ $table = s18 ] && path=benchmarks/results/s19_experiments/session18_expert_configs.json
  RESULT_TAG=_$table timeout -k 5 170 python -c "
import sys; sys.path.insert(0, 'benchmarks')
from moe_fusion.lowering import expert_configs
expert_configs.TABLE_PATH = '$path'
import gpu_shared_strategies
gpu_shared_strategies.main(['--out', '$OUT', '--shapes', 'dsv3-ep8', '--dtypes', 'fp8', '--m', '1,4', '--seeds', '$SEEDS',
                            '--sets', '32', '--strategies', 'stream,stream-late'])" > "$OUT/$table.txt" 2>&1
  echo "== $table"; python benchmarks/routing_seeds.py "$OUT/shared_strategies_$table.json" | grep -- "-fp8 |"
done 2>&1 | tee "$OUT/fits.txt"
timeout -k 5 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_layer.py -k "late" 2>&1 | tail -n 3 | tee "$OUT/tests.txt"
