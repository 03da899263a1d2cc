"""Why the same layer times differently from one CUDA-graph capture to the next (issue 6's dsv3-ep8 figures):

    python benchmarks/gpu_capture_spread.py --out DIR [--shape dsv3-ep8] [--dtype fp8] [--m 1] [--hits 0,1]
        [--captures 12] [--placement same|pad|keep|eager] [--seed 0] [--sets 32]

Every timing of gpu_layer_by_hits captures a graph of its own (bench.time_point). Session 29 timed the plan under
three names in one process (results/s29_experiments/call7): the readings fell into states ~1.3 µs apart, then
~2.4 more, at 0 and at 1 local expert hit, whatever the name, so a by-hits figure depends on which states its
timings drew. This captures the layer's calls on the same inputs of one hit count --captures times. Each graph is
timed, replayed once under the profiler, and timed again (does a graph keep its state?); from that replay come each
call's period (one call's first kernel to the next's), the streams its kernels ran on and the middle call's
kernels; from the capture, the address of the first call's output and the segments of the graph's memory pool
(where the layer's buffers lie in that graph: the steps between the states look like whole round trips). It then
prints one row per capture, and the middle call of the fastest and of the slowest capture, so that where a slow
graph loses its time can be read off beside a fast one. --placement moves the layer's buffers between captures.

Session 30 (results/session30.md): inside a process every capture read the same to 0.3 µs, whatever the placement
(pool offsets, fresh pools, eager calls between captures), while by-hits in the same process read 1.3-1.9 µs more.
So the states are not the captures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu_layer_by_hits import (layer_bench_config, middle_call, print_kernels, profiled_replay_kernels,  # noqa: E402
                               sets_by_hits, split_calls)
from moe_fusion.tools import bench, timing  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402

REPLAYS, BATCHES = 10, 5
PAD_STEP = 24 << 10  # bytes; 12 captures stay inside one 2 MB segment of small blocks
PLACEMENTS = dict(
    same="nothing: each capture's pool takes the memory the last one freed",
    pad="capture i takes i * PAD_STEP bytes of its pool before the calls: the same pages, other offsets",
    keep="every graph is kept, so each capture's pool is memory no earlier one used",
    eager="the calls run eagerly on the current stream before each capture, as bench.time_point does",
)


def call_periods(calls: List[List[dict]]) -> List[float]:
    """µs from each call's first kernel to the next call's."""
    return [round(b[0]["start_us"] - a[0]["start_us"], 2) for a, b in zip(calls, calls[1:])]


def replay_summary(calls: List[List[dict]]) -> dict:
    """What one profiled replay says of its calls: their periods (median, min, max), the streams their kernels
    ran on, and the middle call's kernels with times from its first kernel."""
    periods = call_periods(calls)
    return dict(
        period_median_us=statistics.median(periods) if periods else None,
        period_min_us=min(periods, default=None), period_max_us=max(periods, default=None),
        streams=sorted({str(k["stream"]) for call in calls for k in call}),
        middle_call=middle_call(calls)[1],
    )


def pool_segments(pool) -> List[str]:
    """The allocator's segments of a graph's memory pool (``graph.pool()``), as "address:bytes"."""
    return [f"{seg['address']:#x}:{seg['total_size']}" for seg in torch.cuda.memory_snapshot()
            if tuple(seg.get("segment_pool_id", ())) == tuple(pool)]


def measure_capture(fn, inputs: List[tuple], trace_path: str,
                    pad_bytes: int = 0) -> Tuple[dict, "torch.cuda.CUDAGraph"]:
    """One capture's row, and its graph."""
    graph, addresses = timing.capture_calls(fn, inputs, pad_bytes)
    row = dict(us=timing.replayed_call_us(graph, len(inputs), REPLAYS, BATCHES), pad_bytes=pad_bytes,
               first_output=None if addresses[0] is None else hex(addresses[0]), pool=pool_segments(graph.pool()))
    calls = split_calls(profiled_replay_kernels(graph, trace_path))
    row.update(replay_summary(calls) if calls else dict(error="no layer call in the profiled replay"))
    row["us_after_profile"] = timing.replayed_call_us(graph, len(inputs), REPLAYS, BATCHES)
    return row, graph


def placed_captures(fn, inputs: List[tuple], trace_path: str, placement: str, captures: int) -> List[dict]:
    """--captures rows; between them, what --placement says moves the layer's buffers (PLACEMENTS)."""
    rows, kept = [], []
    for i in range(captures):
        if placement == "eager":
            for args in inputs:
                fn(*args)
            torch.cuda.synchronize()
        row, graph = measure_capture(fn, inputs, trace_path, i * PAD_STEP if placement == "pad" else 0)
        if placement == "keep":
            kept.append(graph)
        rows.append(row)
        del graph  # one not kept frees its pool before the next capture
    return rows


def report(h: int, rows: List[dict]) -> None:
    print(f"hits={h}: capture, µs, µs after the profiled replay, pad bytes, call period median/min/max µs, "
          f"streams, first output, pool segments")
    for i, r in enumerate(rows):
        print(f"  {i:3d} {r['us']:7.1f} {r['us_after_profile']:7.1f} {r['pad_bytes']:7d}   "
              f"{r.get('period_median_us')} / "
              f"{r.get('period_min_us')} / {r.get('period_max_us')}   {','.join(r.get('streams', []))}   "
              f"{r['first_output']}   {' '.join(r['pool'])}", flush=True)
    fastest, slowest = min(rows, key=lambda r: r["us"]), max(rows, key=lambda r: r["us"])
    for title, r in (("fastest", fastest), ("slowest", slowest)):
        print_kernels(f"  the {title} capture's middle call ({r['us']:.1f} µs):", r.get("middle_call", []))


@torch.no_grad()
def spread_by_hits(sb: "bench.ShapeBench", fn, args, result: dict) -> None:
    """--captures graphs of the layer per hit count in --hits, reported and written after each count."""
    found = sets_by_hits(sb, args.m, args.sets, args.candidates)
    for h in (int(h) for h in args.hits.split(",")):
        if h not in found:
            print(f"hits={h}: fewer than {args.sets} of {args.candidates} inputs hit {h} local experts; skipped")
            continue
        inputs = [(x, sb.weights) for x in found[h]]
        with tempfile.TemporaryDirectory() as scratch:
            rows = placed_captures(fn, inputs, os.path.join(scratch, "trace.json"), args.placement, args.captures)
        result["hits"][h] = rows
        report(h, rows)
        with open(os.path.join(args.out, "capture_spread.json"), "w") as f:
            json.dump(result, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="dsv3-ep8", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="fp8")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--hits", default="0,1", help="comma-separated local-expert hit counts")
    p.add_argument("--captures", type=int, default=12)
    p.add_argument("--placement", default="same", choices=sorted(PLACEMENTS),
                   help="; ".join(f"{k}: {v}" for k, v in PLACEMENTS.items()))
    p.add_argument("--seed", type=int, default=0, help="bench seed (weights, router, inputs)")
    p.add_argument("--sets", type=int, default=32, help="inputs (calls) per graph, all of one hit count")
    p.add_argument("--candidates", type=int, default=4096, help="inputs drawn and routed to find them")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_capture_spread needs CUDA: it times and profiles CUDA graphs")
    os.makedirs(args.out, exist_ok=True)
    cfg = layer_bench_config(torch.device("cuda"), [args.m], args.sets, 0.25, args.seed)
    spec = bench.shape_spec(cfg, args.shape, args.dtype)
    sb = bench.ShapeBench(cfg, spec)
    fn = bench.moe_fusion_fn(spec, "layer")
    result: Dict[str, Any] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                  argv=sys.argv[1:] if argv is None else list(argv), hits={})
    try:
        spread_by_hits(sb, fn, args, result)
    finally:
        sb.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
