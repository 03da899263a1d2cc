"""The whole layer's time by how many local experts a call's routing hits, and its expectation over the
routing an expert-parallel layer should expect (issue 6's dsv3-ep8 figures):

    python benchmarks/gpu_layer_by_hits.py --out DIR [--shape dsv3-ep8] [--dtype fp8] [--m 1,4] [--seeds 0]
        [--sets 32] [--variant NAME:SETTING[,SETTING...] ...]
    python benchmarks/gpu_layer_by_hits.py --summarize DIR/by_hits.json [--markdown PATH]

Under expert parallelism a call's time follows the distinct local experts its routing hits, and with the
bench's contiguous expert map and DeepSeek's grouped routing that count is far from its mean: at dsv3-ep8
M = 1 about half the calls hit no local expert and a quarter hit two (routing_seeds.local_hit_distribution).
So instead of reading a line through several seeds' means (routing_seeds.py), this sorts the bench's own
inputs by the hits of their routing: for each seed (the bench's weights and router, ShapeBench) and M it
draws candidate inputs as the bench does, routes them with the bench layer's preamble, and times the layer
(`ops.call_moe_layer`, the bench's time_point: CUDA-graph replays over --sets inputs) on --sets inputs
that all hit exactly h local experts, for every h that has that many candidates. The summary weights the
times T(h), the median over the seeds and rounds, by the share P(h) of calls that hit h experts, over
routers drawn as the bench draws them: expected µs = sum P(h) T(h). The share of hit counts too rare to
time is charged at the line through the two largest timed counts; the summary says how much that was.

--variant (as in gpu_layer_ab.py: MODULE.ATTR=VALUE settings on moe_fusion.lowering) times each hit count
once per variant and round, the variants alternated, so variants are compared on the same inputs in one
process; without it, the layer's plan ("plan").
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu_layer_ab import applied, parse_variant, resolve  # noqa: E402
from gpu_overlap import copies_out_of_l2, profiled_sections, weight_copies, with_weights  # noqa: E402
from routing_seeds import local_hit_distribution, shape_spec  # noqa: E402
from moe_fusion.lowering import layer as layer_plan  # noqa: E402
from moe_fusion.tools import bench, timing  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402

CANDIDATE_ROWS = 1024  # rows routed per preamble call while sorting candidates
FIRST_KERNEL = "_norm_quant_kernel"  # where each layer call's kernels begin


def layer_bench_config(device: torch.device, ms: List[int], sets: int, seconds_per_point: float,
                       seed: int = 0) -> "bench.Config":
    """The bench's configuration for timing the moe_fusion layer alone, with no budget cutting it short."""
    return bench.Config(device=device, shapes=[], ms=ms, parts=[], dtypes=[], variants=["moe_fusion"], sets=sets,
                        seconds_per_point=seconds_per_point, variant_budget=1e9, max_call_ms=1000.0, seed=seed)


def sets_by_hits(sb: "bench.ShapeBench", m: int, sets: int, candidates: int) -> Dict[int, List[torch.Tensor]]:
    """{h: --sets inputs of m tokens whose routing hits exactly h local experts}, from ``candidates``
    inputs drawn with the bench's generator and routed by the bench layer's preamble; a count with
    fewer candidates than ``sets`` is left out."""
    spec, layer = sb.spec, sb.layer
    xs = torch.randn(candidates * m, spec.hidden_size, generator=sb._generator, device=sb.cfg.device)
    xs = xs.to(spec.torch_dtype)
    ids = torch.cat([layer.preamble(xs[i:i + CANDIDATE_ROWS])[1] for i in range(0, xs.shape[0], CANDIDATE_ROWS)])
    found: Dict[int, List[torch.Tensor]] = defaultdict(list)
    for c in range(candidates):
        rows = slice(c * m, (c + 1) * m)
        h = bench.distinct_local_experts(spec, ids[rows], layer.experts.expert_map)
        if len(found[h]) < sets:
            found[h].append(xs[rows].clone())
    return {h: found[h] for h in sorted(found) if len(found[h]) == sets}


def weight_rotation(sb: "bench.ShapeBench", m: int, copies: int) -> list:
    """The bench's weights, then copies with their own preamble and shared-expert tensors (gpu_overlap.weight_copies),
    ``copies`` in all; 0: as many as take those tensors out of L2 between two calls that read the same copy
    (gpu_overlap.copies_out_of_l2). dsv3-ep8 fp8 reads 48 MB of them per call, inside the H100's 50 MB L2."""
    if copies == 0:
        shared_fp8 = layer_plan.plan_layer(sb.spec, m, sb.cfg.device).shared_fp8
        copies = copies_out_of_l2(sb.spec, shared_fp8, sb.cfg.device)
    return weight_copies(sb.weights, copies)


def expected_us(times: Dict[int, float], shares: Dict[int, float]) -> Tuple[float, float]:
    """(sum P(h) T(h), the share of calls charged by extrapolation). Counts without a time are charged at
    the line through the two largest timed counts (or the one timed count's time), at its value for h."""
    timed = sorted(times)
    if len(timed) >= 2:
        (h0, t0), (h1, t1) = (timed[-2], times[timed[-2]]), (timed[-1], times[timed[-1]])
        slope = (t1 - t0) / (h1 - h0)
    else:
        h1, t1, slope = timed[-1], times[timed[-1]], 0.0
    total = extrapolated = 0.0
    for h, p in shares.items():
        if h in times:
            total += p * times[h]
        else:
            total += p * (t1 + slope * (h - h1))
            extrapolated += p
    return total, extrapolated


def summarize(run: dict, routers: int = 4000) -> List[dict]:
    """One row per (shape, dtype, variant, M): T(h) over the seeds, P(h), and the expectation."""
    grouped: Dict[tuple, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in run["rows"]:
        grouped[r["shape"], r["dtype"], r["variant"], r["m"]][r["hits"]].append(r["us"])
    shares_of: Dict[Tuple[str, int], Dict[int, float]] = {}
    out = []
    for (shape, dtype, variant, m), by_h in sorted(grouped.items()):
        if (shape, m) not in shares_of:
            shares_of[shape, m] = local_hit_distribution(shape_spec(shape, [run]), m, routers=routers)
        shares = shares_of[shape, m]
        times = {h: statistics.median(ts) for h, ts in by_h.items()}
        us, extrapolated = expected_us(times, shares)
        out.append(dict(shape=shape, dtype=dtype, variant=variant, m=m, times=times, shares=shares,
                        timings=max(len(ts) for ts in by_h.values()), expected_us=us, extrapolated_share=extrapolated,
                        expected_hits=sum(h * p for h, p in shares.items())))
    return out


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| shape | dtype | variant | M | timings per h | µs by local experts hit, T(h) (share of calls P(h)) "
             "| expected hits | expected µs | share extrapolated |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        cells = ", ".join(f"{h}: {t:.1f} ({100 * r['shares'].get(h, 0):.0f}%)" for h, t in sorted(r["times"].items()))
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['variant']} | {r['m']} | {r['timings']} | {cells} | "
                     f"{r['expected_hits']:.2f} | {r['expected_us']:.1f} | {100 * r['extrapolated_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def _time_seed(cfg, args, variants, meta: dict, rows: list) -> None:
    spec = bench.shape_spec(cfg, args.shape, args.dtype)
    sb = bench.ShapeBench(cfg, spec)
    fn = bench.moe_fusion_fn(spec, "layer")
    try:
        for m in cfg.ms:
            weights = weight_rotation(sb, m, args.weight_copies)
            meta.setdefault("weight_copies", {})[f"seed {cfg.seed} M={m}"] = len(weights)
            for h, xs in sets_by_hits(sb, m, cfg.sets, args.candidates).items():
                hits = [bench.distinct_local_experts(sb.spec, sb.layer.preamble(x)[1], sb.layer.experts.expert_map)
                        for x in xs]  # as the bench counts them, routed m rows at a time
                inputs = with_weights([(x,) for x in xs], weights)
                for round_, (name, settings) in itertools.product(range(args.rounds), variants):
                    with applied(settings):
                        t = bench.time_point(cfg, fn, inputs)
                    if t.us is None:
                        raise SystemExit(f"{args.shape} {args.dtype} M={m}: not timed ({t.note})")
                    rows.append(dict(shape=args.shape, dtype=args.dtype, variant=name, m=m, hits=h, seed=cfg.seed,
                                     round=round_, us=t.us, kernels=t.kernels, distinct_experts=sum(hits) / len(hits)))
                    print(f"{args.shape} {args.dtype} {name:>12} M={m:3d} hits={h:2d} {t.us:8.1f} us seed {cfg.seed} "
                          f"round {round_}", flush=True)
                    if h in args.profile_hits and round_ == 0 and not args.cpu:
                        with applied(settings), tempfile.TemporaryDirectory() as scratch:
                            kernels, period = middle_call_kernels(fn, inputs, os.path.join(scratch, "trace.json"))
                        rows[-1]["kernels_of_one_call"], rows[-1]["call_period"] = kernels, period
                        print_kernels(f"  one call's kernels (profiled replay), {name} M={m} hits={h}:", kernels)
                        print(f"  the next call's first kernel at {period.get('next_call_us')} us; other GPU work "
                              f"in between: {period.get('other_gpu_work')}", flush=True)
                    _write(args.out, meta, rows)
    finally:
        sb.close()


def middle_call_kernels(fn, input_sets: Sequence[tuple], trace_path: str) -> Tuple[List[dict], dict]:
    """The kernels (name, stream, start/end µs from its first) of the middle call of one profiled replay of
    the timing's graph (every input set once, so its weights come from HBM as in the timing), and where the
    next call's first kernel starts, with any GPU work that is not a kernel (memsets, copies) between them:
    a timing counts the call's whole period, not only its kernels' span."""
    graph, _ = timing.capture_calls(fn, input_sets)
    calls = split_calls(profiled_replay_kernels(graph, trace_path))
    if not calls:
        return [], {}
    middle, kernels = middle_call(calls)
    period = {}
    if middle + 1 < len(calls):
        t0, next_start = calls[middle][0]["start_us"], calls[middle + 1][0]["start_us"]
        period = dict(next_call_us=round(next_start - t0, 2),
                      other_gpu_work=_other_gpu_work(trace_path, t0, next_start))
    return kernels, period


def middle_call(calls: List[List[dict]]) -> Tuple[int, List[dict]]:
    """The middle call's index and its kernels, their times from its first kernel's start."""
    middle = (len(calls) + 1) // 2 - 1
    t0 = calls[middle][0]["start_us"]
    return middle, [dict(k, start_us=round(k["start_us"] - t0, 2), end_us=round(k["end_us"] - t0, 2))
                    for k in calls[middle]]


def profiled_replay_kernels(graph: torch.cuda.CUDAGraph, trace_path: str) -> List[dict]:
    """The kernels of one replay of ``graph`` under the profiler (gpu_overlap.summarize_section's rows)."""
    graph.replay()
    torch.cuda.synchronize()
    return profiled_sections({"graph replay": graph.replay}, trace_path)["graph replay"].get("kernels", [])


def split_calls(kernels: List[dict]) -> List[List[dict]]:
    """A replay's kernels (in start order) cut into layer calls, each from its FIRST_KERNEL; kernels before
    the first call's are left out."""
    starts = [i for i, k in enumerate(kernels) if FIRST_KERNEL in k["name"]]
    return [kernels[a:b] for a, b in zip(starts, starts[1:] + [len(kernels)])]


def _other_gpu_work(trace_path: str, t0: float, t1: float) -> List[str]:
    """GPU activities that are not kernels (memsets, copies) from t0 to t1 µs after the trace's first kernel
    (summarize_section's origin: the trace holds the one profiled replay)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    origin = min(e["ts"] for e in events if e.get("cat") == "kernel")
    return [f"{e['cat']} {e['name'][:40]} at {e['ts'] - origin - t0:.1f} us" for e in events
            if e.get("cat") in ("gpu_memset", "gpu_memcpy") and t0 <= e["ts"] - origin <= t1]


def print_kernels(title: str, kernels: List[dict]) -> None:
    print(title)
    for k in kernels:
        smem = k.get("shared_bytes")
        print(f"  {k['start_us']:7.1f} {k['end_us']:7.1f} {k['end_us'] - k['start_us']:6.1f}  {str(k['stream']):>6}  "
              f"{str(k.get('programs')):>5} prog {str(k.get('registers')):>4} reg "
              f"{'?' if smem is None else round(smem / 1024, 1):>6} KB  {k['name'][:50]}", flush=True)


GPU_STATE_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.draw", "power.limit",
                    "temperature.gpu", "clocks_throttle_reasons.active")


def gpu_state() -> Optional[Dict[str, str]]:
    """nvidia-smi's clocks, power and throttle reasons now (H100s of one kind read up to ~8% apart, session 20),
    or None where nvidia-smi cannot say."""
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_STATE_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(GPU_STATE_FIELDS, (v.strip() for v in line.split(","))))


def _write(out: str, meta: dict, rows: list) -> None:
    with open(os.path.join(out, "by_hits.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--summarize", metavar="JSON", help="print the expectation of an earlier run's rows")
    p.add_argument("--markdown", metavar="PATH", help="with --summarize: also write the table here")
    p.add_argument("--routers", type=int, default=4000,
                   help="with --summarize: routers drawn for P(h) (at dsv3-ep8 M = 1, 1000 routers put the mean hits "
                        "within ~0.03 of the exact 1.0, ~0.4 µs of the expectation; 4000 take ~40 s per M on 2 cores)")
    p.add_argument("--shape", default="dsv3-ep8", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="fp8")
    p.add_argument("--m", default="1,4")
    p.add_argument("--seeds", default="0", help="comma-separated bench seeds (weights, router, inputs)")
    p.add_argument("--sets", type=int, default=32, help="inputs per timing, all of one hit count")
    p.add_argument("--candidates", type=int, default=4096, help="inputs drawn and routed per (seed, M)")
    p.add_argument("--rounds", type=int, default=1,
                   help="timings of each (variant, h), the variants alternated; a single timing fell into one of a "
                        "few states ~1.3 µs apart, then ~2.4 more (session 29; not the captures, session 30), so "
                        "A/Bs take several and the summary their median")
    p.add_argument("--seconds-per-point", type=float, default=0.25)
    p.add_argument("--weight-copies", type=int, default=0,
                   help="copies of the preamble's and shared expert's weights the inputs go round (routed experts "
                        "shared); 0: enough to take them out of L2 between two reads of one copy (4 at dsv3-ep8 fp8 "
                        "on an H100); 1: one copy, as before session 30")
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--profile-hits", default="", help="comma-separated hit counts: print the kernels of one call "
                   "(the middle one of a profiled replay) of each variant there, in the first round")
    p.add_argument("--cpu", action="store_true", help="plumbing smoke run (the CPU runs the reference)")
    args = p.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            text = markdown(summarize(json.load(f), args.routers))
        print(text, end="")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        return 0
    if not args.out:
        p.error("--out is required to time")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu" if args.cpu else "cuda")
    cfg = layer_bench_config(device, [int(m) for m in args.m.split(",")], args.sets, args.seconds_per_point)
    variants = [(name, [resolve(t, v) for t, v in pairs]) for name, pairs in map(parse_variant, args.variant)]
    variants = variants or [("plan", [])]
    args.profile_hits = {int(h) for h in args.profile_hits.split(",") if h}
    meta = dict(device="cpu" if args.cpu else torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, argv=sys.argv[1:] if argv is None else list(argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu_state_at_start=None if args.cpu else gpu_state())
    rows: list = []
    with torch.no_grad():
        for seed in map(int, args.seeds.split(",")):
            cfg.seed = seed
            _time_seed(cfg, args, variants, meta, rows)
    if not args.cpu:
        meta["gpu_state_at_end"] = gpu_state()
        _write(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
