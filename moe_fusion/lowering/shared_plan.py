"""The measured choice of shared-expert strategy per (device, layer shape, M): shared_plan.json.

Regenerate it from the rows of ``benchmarks/gpu_shared_strategies.py`` (its --out JSON files):

    python -m moe_fusion.lowering.shared_plan --from-json a.json,b.json [--log run.log] --write

For each (shape, expert dtype, M) the fastest *allowed* strategy is kept. With fp8 experts an fp8
shared expert ("fused", "stream-fp8", "stream-late-fp8", "inline-fp8" rows) is a numerical change the
user must ask for (MOE_FUSION_SHARED_FP8=1), so those rows make entries of their own (keys ending in
"fp8"), and the plain fp8 key chooses only among the model-dtype "stream", "stream-late", "inline",
"stream-kernels" and "inline-kernels" (cuBLAS, or the expert kernels, in the model dtype). A point's rows
are averaged (several bench seeds: gpu_shared_strategies.py --seeds). Since session 17 the side stream
runs the shared expert on the expert kernels only (layer.py), so "stream" and "stream-kernels" are one
strategy; the table's "stream" entries were measured with cuBLAS there. With fp8 experts cuBLAS was,
averaged over the stored runs, within 1.4% of the kernels' launch or slower; the bf16 entries (M = 64)
were never measured on the kernels (benchmarks/results/session17.md).
A spec, M or device the table does not cover gets the rule in layer.py (a GPU with the SMs of a
tuned one takes its entries: expert_configs.SAME_SMS_AS).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Dict, Iterable, List, Optional

from ..spec import MoESpec
from .expert_configs import read_table, tuned_device

TABLE_PATH = os.path.join(os.path.dirname(__file__), "shared_plan.json")
STRATEGIES = ("stream", "stream-late", "inline", "fused", "stream-kernels", "inline-kernels")
_LOG_ROW = re.compile(
    r"^(\S+)\s+(fp8|bf16)\s+layer\s+((?:stream|inline|fused)(?:-late)?(?:-fp8|-kernels)?)\s+M=\s*(\d+)\s+([\d.]+) us")


def shape_key(spec: MoESpec, fp8_shared: bool = False) -> str:
    """The table's key; fp8_shared: the user allows an fp8 shared expert (LoweringOptions.shared_fp8)."""
    experts = "fp8" if spec.fp8 else spec.dtype
    return (f"{experts}-H{spec.hidden_size}-I{spec.intermediate_size}-E{spec.num_local_experts}of"
            f"{spec.num_experts}-k{spec.top_k}-S{spec.shared_intermediate_size}{'fp8' if fp8_shared else ''}")


def _table(path: str = TABLE_PATH) -> Dict[str, Dict[str, Dict[str, str]]]:
    return read_table(path).get("plans", {})


def lookup(spec: MoESpec, m: int, device_name: str, fp8_shared: bool = False) -> Optional[str]:
    """The measured strategy for m tokens: the entry of the smallest measured M >= m (the largest
    measured M above them all), or None where the table has nothing for this device and shape."""
    table = _table(TABLE_PATH)
    by_m = table.get(tuned_device(device_name, table), {}).get(shape_key(spec, fp8_shared))
    if not by_m:
        return None
    measured = sorted(int(k) for k in by_m)
    bucket = next((x for x in measured if x >= m), measured[-1])
    return by_m[str(bucket)]


def best_strategies(rows: Iterable[dict], specs: Dict[str, MoESpec]) -> Dict[str, Dict[str, str]]:
    """{shape_key: {M: strategy}} from layer rows {shape, dtype, variant, m, us}; repeated
    measurements of one point are averaged."""
    times: Dict[tuple, List[float]] = {}
    for r in rows:
        strategy = r["variant"].replace("-fp8", "")
        if r.get("part", "layer") != "layer" or strategy not in STRATEGIES:
            continue
        fp8 = r["dtype"] == "fp8"
        fp8_shared = fp8 and (strategy == "fused" or r["variant"].endswith("-fp8"))
        spec = specs[r["shape"]].replace(quant="fp8_block" if fp8 else "none")
        times.setdefault((shape_key(spec, fp8_shared), r["m"], strategy), []).append(r["us"])
    plans: Dict[str, Dict[str, str]] = {}
    best: Dict[tuple, tuple] = {}
    for (key, m, strategy), us in times.items():
        mean = sum(us) / len(us)
        if (key, m) not in best or mean < best[(key, m)][0]:
            best[(key, m)] = (mean, strategy)
    for (key, m), (_, strategy) in sorted(best.items()):
        plans.setdefault(key, {})[str(m)] = strategy
    return plans


def rows_from_log(path: str) -> List[dict]:
    """Layer rows of a gpu_shared_strategies.py console log ("dsv3-ep8  fp8  layer  fused  M=  1  107.6 us")."""
    rows = []
    with open(path) as f:
        for line in f:
            match = _LOG_ROW.match(line.strip())
            if match:
                shape, dtype, variant, m, us = match.groups()
                rows.append(dict(shape=shape, dtype=dtype, part="layer", variant=variant, m=int(m), us=float(us)))
    return rows


def main(argv=None) -> int:
    from ..tools.bench_layers import SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-json", default="", help="comma-separated gpu_shared_strategies.py JSON files")
    p.add_argument("--log", default="", help="comma-separated console logs of the same script")
    p.add_argument("--device", default="NVIDIA H100 80GB HBM3", help="device name the rows were measured on")
    p.add_argument("--write", action="store_true", help=f"merge into {TABLE_PATH}")
    args = p.parse_args(argv)
    rows = []
    for path in filter(None, args.from_json.split(",")):
        with open(path) as f:
            rows += json.load(f)["rows"]
    for path in filter(None, args.log.split(",")):
        rows += rows_from_log(path)
    plans = best_strategies(rows, SHAPES)
    print(json.dumps(plans, indent=1))
    if args.write:
        table = json.load(open(TABLE_PATH)) if os.path.exists(TABLE_PATH) else {"plans": {}}
        entries = table["plans"].setdefault(args.device, {})
        for key, by_m in plans.items():  # a run over some M keeps the entries of the others
            entries.setdefault(key, {}).update(by_m)
        with open(TABLE_PATH, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
