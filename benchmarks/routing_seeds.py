"""An expert-parallel layer's time at the routing it should expect, from bench runs over several seeds.

    python benchmarks/routing_seeds.py RUN.json [RUN.json ...] [--markdown PATH]

Under expert parallelism a decode step's time is close to linear in how many of the rank's local
experts the routing hits (each one is a weight stream of its own), and with the bench's random
weights that count is set mostly by the router's weights and correction bias, that is by --seed:
for dsv3-ep8 at M = 1 one seed's input sets hit 0.7 local experts on average, another's 1.3
(session 18). One seed's figure is therefore not the layer's time. Given bench JSON files of
different seeds, this prints per (shape, dtype, part, variant, M): the seeds' mean experts hit and
mean µs, the least-squares line µs = a + b * hits, and that line at the expected hits: top_k *
local / experts at M = 1 (the experts are exchangeable under random weights, and a token picks
distinct experts), otherwise estimated by drawing routers and inputs as the bench does
(expected_local_hits). A shape is the one the run's meta describes (the bench records every shape
it ran, --shape custom included), else the bench's named shape of that name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fusion.lowering import reference  # noqa: E402
from moe_fusion.spec import MoESpec  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402

Key = Tuple[str, str, str, str, int]  # shape, dtype, part, variant, M


def points(runs: Sequence[dict]) -> Dict[Key, List[Tuple[float, float]]]:
    """(experts hit, µs) of every timed row, grouped by point; rows without a time are left out."""
    grouped: Dict[Key, List[Tuple[float, float]]] = defaultdict(list)
    for run in runs:
        for row in run["rows"]:
            if row.get("us") is not None and row.get("distinct_experts") is not None:
                key = (row["shape"], row["dtype"], row["part"], row["variant"], row["m"])
                grouped[key].append((row["distinct_experts"], row["us"]))
    return grouped


def line(pairs: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares (a, b) of µs = a + b * hits; b = 0 where the hits do not vary."""
    n = len(pairs)
    mean_x = sum(x for x, _ in pairs) / n
    mean_y = sum(y for _, y in pairs) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in pairs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / sxx if sxx > 0 else 0.0
    return mean_y - b * mean_x, b


def expected_local_hits(spec: MoESpec, m: int, routers: int = 1000, sets: int = 32, seed: int = 0) -> float:
    """Mean distinct local experts that m tokens hit, over random routers drawn as bench_layers.build_layer
    draws them (router N(0, 1/H), correction bias N(0, 0.1^2), norm weight 1 + N(0, 0.1^2), rank 0 owning
    the first num_local_experts experts) and random inputs."""
    if m == 1:
        return spec.top_k * spec.num_local_experts / spec.num_experts
    return sum(h * p for h, p in local_hit_distribution(spec, m, routers, sets, seed).items())


def local_hit_distribution(spec: MoESpec, m: int, routers: int = 1000, sets: int = 32,
                           seed: int = 0) -> Dict[int, float]:
    """{distinct local experts hit: share of calls} for calls of m tokens, routers and inputs drawn as
    expected_local_hits says. With the bench's contiguous expert map and grouped routing the shares are far
    from binomial: a dsv3-ep8 token either picks the rank's group (about 2 of its experts) or none of it."""
    g = torch.Generator().manual_seed(seed)
    H, E = spec.hidden_size, spec.num_experts
    counts: Dict[int, int] = defaultdict(int)
    for _ in range(routers):
        router = torch.randn(E, H, generator=g) / H ** 0.5
        bias = 0.1 * torch.randn(E, generator=g) if spec.correction_bias else None
        norm = 1 + 0.1 * torch.randn(H, generator=g)
        x = torch.randn(sets * m, H, generator=g)
        normed = reference.rms_norm(x, norm, spec.rms_norm_eps) if spec.rms_norm else x
        ids, _ = reference.select_experts(spec, reference.router_logits(spec, normed, router), bias)
        hit = torch.zeros(sets, E, dtype=torch.bool).scatter_(1, ids.view(sets, m * spec.top_k).long(), True)
        for h in hit[:, :spec.num_local_experts].sum(1).tolist():
            counts[h] += 1
    total = routers * sets
    return {h: counts[h] / total for h in sorted(counts)}


def shape_spec(shape: str, runs: Sequence[dict]) -> Optional[MoESpec]:
    """The spec a run describes for ``shape`` (the bench's meta has every shape it ran, --shape custom
    included), else the bench's named shape; None where neither knows it."""
    for run in runs:
        described = run.get("meta", {}).get("shapes", {}).get(shape)
        if described:
            return MoESpec(**described)
    return SHAPES.get(shape)


def summary(runs: Sequence[dict]) -> List[dict]:
    out = []
    expected_by_shape_m: Dict[Tuple[str, int], float] = {}  # drawn once per (shape, M), not per dtype or variant
    for key, pairs in sorted(points(runs).items()):
        shape, dtype, part, variant, m = key
        spec = shape_spec(shape, runs)
        a, b = line(pairs)
        hits = sum(x for x, _ in pairs) / len(pairs)
        us = sum(y for _, y in pairs) / len(pairs)
        expected = None
        if spec is not None and spec.num_local_experts < spec.num_experts:
            if (shape, m) not in expected_by_shape_m:
                expected_by_shape_m[shape, m] = expected_local_hits(spec, m)
            expected = expected_by_shape_m[shape, m]
        out.append(dict(shape=shape, dtype=dtype, part=part, variant=variant, m=m, seeds=len(pairs),
                        mean_hits=hits, mean_us=us, intercept_us=a, us_per_expert=b, expected_hits=expected,
                        us_at_expected=None if expected is None else a + b * expected))
    return out


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| shape | dtype | part | variant | M | seeds | mean hits | mean µs | µs = a + b·hits | expected hits "
             "| µs at expected |", "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        expected = "-" if r["expected_hits"] is None else f"{r['expected_hits']:.2f}"
        at = "-" if r["us_at_expected"] is None else f"{r['us_at_expected']:.1f}"
        fit = f"{r['intercept_us']:.1f} {r['us_per_expert']:+.1f}·hits"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['part']} | {r['variant']} | {r['m']} | {r['seeds']} | "
                     f"{r['mean_hits']:.2f} | {r['mean_us']:.1f} | {fit} | {expected} | {at} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="bench --json files, one per --seed")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table here")
    args = ap.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    text = markdown(summary(runs))
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
