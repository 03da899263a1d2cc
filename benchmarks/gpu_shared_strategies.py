"""Shared-expert strategies and the fp8 h quantisation, measured for the layer plan (issues 5, 6):

    python benchmarks/gpu_shared_strategies.py --out DIR [--shapes dsv3-ep8,dsv3] [--dtypes fp8,bf16]
        [--m 1,2,4,16,64] [--profile-m 1]

For each (shape, dtype) the weights are built once (moe-fusion bench's ShapeBench) and timed with
the same method as ``moe-fusion bench`` (CUDA-graph replays over rotated inputs):
  - experts part (routed experts alone), fp8: h quantised in GEMM1's epilogue ("gemm1") or by its
    own launch ("kernel", experts.FUSED_H_QUANT = False);
  - layer part for each shared-expert strategy (stream, inline, fused), and for fp8 also the
    previous configuration (stream + h-quant kernel).
Rows go to DIR/shared_strategies.json and .md after every point (a cut-off run keeps what it did);
with --profile-m, the per-kernel times of one layer call per strategy at that M (ep8 shapes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

from moe_fusion.lowering import experts, layer
from moe_fusion.tools import bench, bench_layers, timing

COPY_CEILING = 3.02e12
_TAG = os.environ.get("RESULT_TAG", "")  # the copy bandwidth (what % columns are held to)


def _variants(part: str, fp8: bool, strategies, hq_ab: bool):
    """(name, shared strategy or None, fused h quantisation)."""
    if part == "experts":
        return [("gemm1-hquant", None, True)] + ([("kernel-hquant", None, False)] if fp8 else [])
    if hq_ab:  # fused strategy, h quantised in GEMM1 or by its own launch, alternated twice
        return [("fused", "fused", True), ("fused+kernel-hquant", "fused", False)] * 2 if fp8 else []
    rows = [(s, s, True) for s in strategies]
    return rows + ([("stream+kernel-hquant", "stream", False)] if fp8 and "stream" in strategies else [])


def _profile(fn, inputs, path: str) -> None:
    fn(*inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn(*inputs)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="dsv3-ep8,dsv3")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--m", default="1,2,4,16,64")
    p.add_argument("--parts", default="experts,layer")
    p.add_argument("--profile-m", type=int, default=0)
    p.add_argument("--strategies", default="stream,inline,fused")
    p.add_argument("--hq-ab", action="store_true", help="layer: fused strategy, h-quant in GEMM1 vs its own launch")
    p.add_argument("--seconds-per-point", type=float, default=0.15)
    p.add_argument("--cpu", action="store_true", help="plumbing smoke run (tiny shapes; the CPU runs the reference)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = bench.Config(device=torch.device("cpu" if args.cpu else "cuda"), shapes=[], ms=[int(m) for m in args.m.split(",")], parts=[],
                       dtypes=[], variants=["moe_fusion"], sets=8, seconds_per_point=args.seconds_per_point,
                       variant_budget=1e9, max_call_ms=1000.0, seed=0)
    meta = dict(device="cpu" if args.cpu else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.utcnow().isoformat(timespec="seconds"))
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            spec = bench.shape_spec(cfg, shape, dtype)
            sb = bench.ShapeBench(cfg, spec)
            try:
                for part in args.parts.split(","):
                    fn = sb.moe_fusion_fn(part)
                    for m in cfg.ms:
                        inp = sb.inputs(part, m)
                        for name, strategy, fused_hq in _variants(part, spec.fp8, args.strategies.split(","),
                                                                  args.hq_ab):
                            layer.options.shared_expert = strategy
                            experts.FUSED_H_QUANT = fused_hq
                            t = bench.time_point(cfg, fn, inp.op_sets)
                            row = dict(shape=shape, dtype=dtype, part=part, variant=name, m=m, us=t.us,
                                       kernels=t.kernels, bytes=inp.bytes,
                                       pct=100 * inp.bytes / (t.us * 1e-6) / COPY_CEILING if t.us else None)
                            rows.append(row)
                            print(f"{shape:9s} {dtype:4s} {part:7s} {name:22s} M={m:3d} {t.us:9.1f} us "
                                  f"{t.kernels} kernels {row['pct']:.0f}%", flush=True)
                            _write(args.out, meta, rows)
                            if part == "layer" and m == args.profile_m and shape.endswith("ep8") and not args.cpu:
                                _profile(fn, inp.op_sets[0],
                                         os.path.join(args.out, f"profile_{shape}_{dtype}_M{m}_{name}.txt"
                                                      .replace("+", "_")))
            finally:
                layer.options.shared_expert, experts.FUSED_H_QUANT = None, True
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
