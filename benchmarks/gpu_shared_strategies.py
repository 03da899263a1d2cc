"""Shared-expert strategies, measured for the layer plan (issue 6; shared_plan.json is made from
these rows by ``python -m moe_fusion.lowering.shared_plan``):

    python benchmarks/gpu_shared_strategies.py --out DIR [--shapes dsv3-ep8,dsv3] [--dtypes fp8,bf16]
        [--m 1,2,4,16,64] [--seeds 0] [--profile-m 1]

For each (shape, dtype) the weights are built once (moe-fusion bench's ShapeBench) and the whole
layer is timed with the same method as ``moe-fusion bench`` (CUDA-graph replays over rotated
inputs) for each shared-expert strategy: stream, stream-late, inline, fused, stream-kernels and inline-kernels (the
shared expert as its own launch of the expert kernels in the model dtype; since session 17 "stream" is
"stream-kernels", the side stream runs no cuBLAS: layer.py), and with fp8 experts also
stream-fp8, stream-late-fp8 and inline-fp8 (that launch on the fp8 expert kernels, LoweringOptions.shared_fp8).
--seeds: the weights and routers of each bench seed in turn; under expert parallelism the layer's time
follows how many local experts the routing hits, which one seed's router sets far from its average
(benchmarks/routing_seeds.py), and shared_plan averages a point's rows over the seeds. Rows go to
DIR/shared_strategies.json and .md after every point (a cut-off run keeps what it did); with
--profile-m, the per-kernel times of one layer call per strategy at that M (ep8 shapes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

from moe_fusion.lowering import layer
from moe_fusion.tools import bench

COPY_CEILING = 3.02e12
_TAG = os.environ.get("RESULT_TAG", "")  # the copy bandwidth (what % columns are held to)


def _variants(fp8: bool, strategies):
    """(name, shared strategy, shared expert on the fp8 expert kernels)."""
    rows = [(s, s, False) for s in strategies]
    return rows + [(f"{s}-fp8", s, True) for s in strategies if fp8 and s in ("stream", "stream-late", "inline")]


def _profile(fn, inputs, path: str) -> None:
    fn(*inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn(*inputs)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="dsv3-ep8,dsv3")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--m", default="1,2,4,16,64")
    p.add_argument("--seeds", default="0", help="comma-separated bench seeds (weights, routers, inputs)")
    p.add_argument("--sets", type=int, default=8, help="input sets per point (the bench's --sets)")
    p.add_argument("--profile-m", type=int, default=0)
    p.add_argument("--strategies", default=",".join(layer.SHARED_STRATEGIES))
    p.add_argument("--seconds-per-point", type=float, default=0.15)
    p.add_argument("--cpu", action="store_true", help="plumbing smoke run (tiny shapes; the CPU runs the reference)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfg = bench.Config(device=torch.device("cpu" if args.cpu else "cuda"), shapes=[], ms=[int(m) for m in args.m.split(",")], parts=[],
                       dtypes=[], variants=["moe_fusion"], sets=args.sets, seconds_per_point=args.seconds_per_point,
                       variant_budget=1e9, max_call_ms=1000.0, seed=0)
    meta = dict(device="cpu" if args.cpu else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.utcnow().isoformat(timespec="seconds"))
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for seed in map(int, args.seeds.split(",")):
                cfg.seed = seed
                _time_strategies(cfg, args, shape, dtype, meta, rows)


def _time_strategies(cfg, args, shape: str, dtype: str, meta: dict, rows: list) -> None:
    """Rows for every strategy at every M, on the weights and routers of bench seed cfg.seed."""
    spec = bench.shape_spec(cfg, shape, dtype)
    sb = bench.ShapeBench(cfg, spec)
    fn = bench.moe_fusion_fn(spec, "layer")
    try:
        for m in cfg.ms:
            inp = sb.inputs("layer", m)
            for name, strategy, shared_fp8 in _variants(spec.fp8, args.strategies.split(",")):
                layer.options.shared_expert, layer.options.shared_fp8 = strategy, shared_fp8
                t = bench.time_point(cfg, fn, inp.op_sets)
                floor_bytes = sb.layer_bytes(m, inp.distinct_experts)  # this variant's shared expert
                row = dict(shape=shape, dtype=dtype, part="layer", variant=name, m=m, us=t.us, seed=cfg.seed,
                           distinct_experts=inp.distinct_experts,
                           kernels=t.kernels, bytes=floor_bytes,
                           pct=100 * floor_bytes / (t.us * 1e-6) / COPY_CEILING if t.us else None)
                rows.append(row)
                print(f"{shape:9s} {dtype:4s} layer   {name:22s} M={m:3d} {t.us:9.1f} us "
                      f"{t.kernels} kernels {row['pct']:.0f}% seed {cfg.seed}", flush=True)
                _write(args.out, meta, rows)
                if m == args.profile_m and shape.endswith("ep8") and not args.cpu:
                    path = os.path.join(args.out, f"profile_{shape}_{dtype}_M{m}_{name}_seed{cfg.seed}.txt")
                    _profile(fn, inp.op_sets[0], path)
    finally:
        layer.options.shared_expert, layer.options.shared_fp8 = None, False
        sb.close()


def _write(out: str, meta: dict, rows: list) -> None:
    with open(os.path.join(out, f"shared_strategies{_TAG}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             "µs per call (CUDA-graph replay), % = touched bytes / time / 3.02 TB/s", "",
             "| shape | dtype | part | variant | M | µs | kernels | % |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['part']} | {r['variant']} | {r['m']} | {r['us']:.1f} | "
                     f"{r['kernels']} | {r['pct']:.0f} |")
    with open(os.path.join(out, f"shared_strategies{_TAG}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
