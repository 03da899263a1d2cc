#!/usr/bin/env bash
# A/B of moe_fusion source trees on the GPU: the same `moe-fusion bench` command run in turn with
# PYTHONPATH on each tree, AB_ROUNDS times (alternating, so drift in clocks or memory hits every
# tree alike), each run in a process of its own. A tree is a directory holding a moe_fusion package:
# "." for the working tree, or a copy of an earlier one made beside it, e.g.
#   mkdir -p _head && git archive HEAD moe_fusion | tar -x -C _head
# A variant may add environment settings after its directory: "half=.@MOE_FUSION_X=1@MOE_FUSION_Y=2".
# Usage (from the repository root, OUT set):
#   AB_TREES="head=_head work=." AB_ROUNDS=2 bash benchmarks/gpu_ab.sh --shape dsv3-ep8 --dtype fp8 \
#       --parts layer --m 1,2,4 --variants moe_fusion
# Prints one line per run: the tree, the round and the moe_fusion µs per (part, M); the JSON of each
# run goes to $OUT/ab_<tree>_<round>.json. MOE_FUSION_* variables apply to every tree.
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for tree in ${AB_TREES:-work=.}; do
    tag=${tree%%=*} rest=${tree#*=}
    dir=${rest%%@*} settings=${rest#"${rest%%@*}"}
    json="$OUT/ab_${tag}_${round}.json"
    env ${settings//@/ } PYTHONPATH="$(cd "$dir" && pwd)" timeout -k 10 "${AB_RUN_S:-240}" python3 -m moe_fusion.tools.bench "$@" \
      --json "$json" >"$OUT/ab_${tag}_${round}.log" 2>&1 || echo "$tag round $round: exit $? (log $OUT/ab_${tag}_${round}.log)"
    [ -s "$json" ] && python3 - "$json" "$tag" "$round" <<'PY'
import json, sys
path, tag, round_ = sys.argv[1:]
rows = [r for r in json.load(open(path))["rows"] if r.get("variant") == "moe_fusion" and r.get("us")]
print(f"{tag:>8} round {round_}: " + "  ".join(f"{r['part']} M={r['m']} {r['us']:.1f}" for r in rows))
PY
  done
done
