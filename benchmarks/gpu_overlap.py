"""Shared expert on the side stream (issue 6): does the preamble hide behind the shared expert?

    python benchmarks/gpu_overlap.py --out DIR [--m 1,4] [--dtypes bf16,fp8] [--shared-on kernels|kernels-fp8]
        [--smoke]

For the dsv3-ep8 layer (the full dsv3 router, 32 local experts; bf16 or fp8 experts) at each M,
under CUDA-graph replay (moe_fusion.tools.timing: median of batches, inputs rotated over 8 sets):
  shared            the shared expert alone, in the model dtype as a launch of the expert kernels of its
                    own (shared_expert.SharedExpertOnExpertKernels: what the layer runs on the side stream),
                    or with --shared-on kernels-fp8 that launch in fp8 on x's fp8 groups made beforehand
                    (what the layer runs with MOE_FUSION_SHARED_FP8=1; fp8 experts only). Until session 17
                    the default was cuBLAS, which the layer no longer runs on the side stream (layer.py)
  norm+shared       the preamble's norm kernel (with its fp8 quantisation for the fp8 experts), then the
                    shared expert on the same stream: what the shared expert needs in a model that has no
                    router, since its input is the normed hidden states
  preamble          preamble.fused_preamble alone (norm [+ fp8 quantisation], router, routing, alignment)
  pre+shared stream the preamble with the shared expert forked onto the side stream right after the
                    norm (its after_norm hook, streams.fork), joined at the end: what the layer does
  pre+shared inline the same on one stream, the shared expert after the preamble
  pre+shared unblocked  the shared expert forked onto the side stream before the norm, on the inputs the
                    shared expert alone reads (its fp8 groups made beforehand), then the preamble: a bound
                    for a shared expert that needs no norm kernel (it would make its own input)
  pre+shared unblocked late  the same shared expert, waiting for nothing still, but queued once the norm is:
                    the norm's branch of the graph comes first
  layer stream / layer inline   the whole layer (layer.moe_layer), for context; its time depends on how many
                    local experts the input sets' routing hits (the table's column; the bench's routing differs)
ratio = (pre+shared stream) / shared; the target is <= 1.1 (the preamble almost entirely hidden).
ratio after norm = (pre+shared stream) / (norm+shared): what the routing part of the preamble (router,
routing, alignment) adds to a shared expert that waits for the norm as it must.

The shared expert's weights (44 MB in fp8, 88 MB in bf16) and the router's fit in or near the H100's
50 MB L2, so timing them over one copy partly measures the cache, in the shared expert alone most of
all. Each input set therefore comes with its own copy of the preamble and shared-expert weights
(--weight-copies, by default enough copies to exceed L2 L2_ROTATION_FACTOR times, as the bench does
for the preamble); the routed experts are shared by all copies. --weight-copies 1 times one copy, as
sessions 3-16 did.

Then one call of "pre+shared stream" (or of the variant --profile names) is profiled, eagerly and as a
graph replay: per kernel its name, stream and start/end relative to the first kernel, and how much of the
shared expert's busy time overlaps the preamble's kernels. DIR gets overlap.json, overlap.md and
overlap_trace.json (the chrome trace of the first dtype at the first M); the table is printed last.
--smoke: a tiny layer, each variant called once (the Triton interpreter where there is no GPU), no timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():  # before the kernel modules are imported (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import triton  # noqa: E402

from layer_cases import layer_options, layer_weights, with_own_tensors  # noqa: E402
from moe_fusion.lowering import layer, preamble, reference, streams  # noqa: E402
from moe_fusion.lowering.norm_quant_kernel import norm_quant  # noqa: E402
from moe_fusion.lowering.shared_expert import SharedExpertOnExpertKernels  # noqa: E402
from moe_fusion.spec import MoESpec, MoEWeights  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402
from moe_fusion.tools.bench import L2_ROTATION_FACTOR, copies_beyond_l2, distinct_local_experts  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES, preamble_bytes, shared_bytes  # noqa: E402

DTYPES = {"bf16": "none", "fp8": "fp8_block"}
N_SETS = 8
TARGET_RATIO = 1.1
PREAMBLE_KERNELS = ("_norm_quant_kernel", "_router_route_align_kernel", "_router_kernel", "_topk_kernel",
                    "_align_kernel")
VARIANTS = ("shared", "norm+shared", "preamble", "pre+shared stream", "pre+shared inline", "pre+shared unblocked",
            "pre+shared unblocked late", "layer stream", "layer inline")
ON_SIDE_STREAM = ("pre+shared stream", "pre+shared unblocked", "pre+shared unblocked late", "layer stream")
# Each ratio's name, numerator and denominator (variants); "stream" is the issue's.
RATIOS = (("stream", "pre+shared stream", "shared"), ("inline", "pre+shared inline", "shared"),
          ("unblocked", "pre+shared unblocked", "shared"), ("unblocked late", "pre+shared unblocked late", "shared"),
          ("after norm", "pre+shared stream", "norm+shared"))
SHARED_ON = ("kernels", "kernels-fp8")
# The weights each input set gets a copy of: the preamble's and the shared expert's.
PREAMBLE_WEIGHTS = ("router_weight", "norm_weight", "correction_bias")
COPIED_WEIGHTS = PREAMBLE_WEIGHTS + ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")


# ----------------------------------------------------------------------------- the timed calls
def variant_fn(name: str, spec: MoESpec, block_m: int, shared_on: str = "kernels",
               quantized: Optional[Dict[int, tuple]] = None) -> Callable:
    """fn(x, normed, w) for one variant; every variant allocates its buffers on the current stream,
    as the layer does (streams.py: the side stream never allocates). shared_on: one of SHARED_ON;
    with "kernels-fp8", ``quantized`` maps id(normed) of each input set to its fp8 groups, which the
    shared expert alone reads as it would read the norm kernel's."""
    in_fp8 = shared_on == "kernels-fp8"

    def shared_job(w, normed, x_fp8=None, x_scale=None):  # allocates now; run() may go to the side stream
        return SharedExpertOnExpertKernels(spec, normed, x_fp8, x_scale, w, in_fp8, False)

    def ready_job(w, normed):  # on the inputs made beforehand: normed, or with "kernels-fp8" its fp8 groups
        return shared_job(w, normed, *(quantized or {}).get(id(normed), (None, None)))

    def shared(x, normed, w):
        ready_job(w, normed).run()

    def norm_shared(x, normed, w):
        norm_outputs = norm_quant(x, w.norm_weight, spec.rms_norm_eps, spec.fp8,
                                  out_dtype=preamble.normed_dtype_of(spec, x, w))
        shared_job(w, *norm_outputs).run()

    def pre(x, normed, w):
        preamble.fused_preamble(spec, x, w, block_m=block_m)

    # A forked job is held until the join: freed earlier, its buffers would go to the preamble's allocations
    # on the main stream while the side stream still uses them (as the layer holds its job, layer.py).
    def pre_shared_stream(x, normed, w):
        forked = []
        fork = lambda *norm_outputs: forked.append(fork_job(x, shared_job(w, *norm_outputs)))  # noqa: E731
        preamble.fused_preamble(spec, x, w, block_m=block_m, after_norm=fork)
        streams.join(x.device)

    def pre_shared_unblocked(x, normed, w):
        job = fork_job(x, ready_job(w, normed))
        preamble.fused_preamble(spec, x, w, block_m=block_m)
        streams.join(x.device)
        del job  # held until here, after the join

    def pre_shared_unblocked_late(x, normed, w):  # queued once the norm is, waiting only for what came before it
        job, start = ready_job(w, normed), streams.mark(x.device)
        fork = lambda *norm_outputs: streams.fork(x.device, job.run, after=start)  # noqa: E731
        preamble.fused_preamble(spec, x, w, block_m=block_m, after_norm=fork)
        streams.join(x.device)

    def pre_shared_inline(x, normed, w):
        pre = preamble.fused_preamble(spec, x, w, block_m=block_m)
        shared_job(w, pre.normed, pre.x_fp8, pre.x_scale).run()

    def whole_layer(strategy):
        def fn(x, normed, w):
            with layer_options(False, strategy + "-kernels", shared_fp8=in_fp8):
                layer.moe_layer(spec, x, w)
        return fn

    return {"shared": shared, "norm+shared": norm_shared, "preamble": pre, "pre+shared stream": pre_shared_stream,
            "pre+shared inline": pre_shared_inline,
            "pre+shared unblocked": pre_shared_unblocked, "pre+shared unblocked late": pre_shared_unblocked_late,
            "layer stream": whole_layer("stream"),
            "layer inline": whole_layer("inline")}[name]


def fork_job(x: torch.Tensor, job):
    """job.run() queued on the side stream; returns the job, whose buffers the caller holds until the join."""
    streams.fork(x.device, job.run)
    return job


def local_experts_hit(spec: MoESpec, sets: Sequence[tuple]) -> float:
    """Mean distinct local experts the input sets' routing hits: the whole layer's time is close to linear
    in it (benchmarks/routing_seeds.py), so its variants compare with the bench only at equal hits."""
    hits = [distinct_local_experts(spec, reference.moe_preamble(spec, x, w)[1], w.expert_map) for x, _, w in sets]
    return round(sum(hits) / len(hits), 2)


def input_sets(spec: MoESpec, M: int, device, n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(M)
    return [tuple(torch.randn(M, spec.hidden_size, generator=g, device=device, dtype=spec.torch_dtype)
                  for _ in range(2)) for _ in range(n)]


def with_weights(sets: Sequence[tuple], weights: Sequence[MoEWeights]) -> List[tuple]:
    """(x, normed, w) per input set, w going round the weight copies."""
    return [(*inputs, weights[i % len(weights)]) for i, inputs in enumerate(sets)]


def weight_copy_count(spec: MoESpec, shared_fp8: bool, l2_bytes: int) -> int:
    """Copies of the preamble's and shared expert's weights that together exceed L2 L2_ROTATION_FACTOR
    times, at most one per input set."""
    per_copy = preamble_bytes(spec) + (shared_bytes(spec, shared_fp8) if spec.has_shared_experts else 0)
    return min(N_SETS, copies_beyond_l2(per_copy, l2_bytes))


def copies_out_of_l2(spec: MoESpec, shared_fp8: bool, device: torch.device) -> int:
    """weight_copy_count for the device's L2; one copy where there is no GPU (no L2 to leave)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    return weight_copy_count(spec, shared_fp8, l2) if l2 else 1


def ratio_key(ratio: str) -> str:
    return "ratio_" + ratio.replace(" ", "_")


def weight_copies(w: MoEWeights, count: int) -> List[MoEWeights]:
    """w, then count - 1 copies with their own preamble and shared-expert tensors (routed experts shared)."""
    return [w] + [with_own_tensors(w, COPIED_WEIGHTS) for _ in range(count - 1)]


# ----------------------------------------------------------------------------- trace analysis
def merged(intervals: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[List[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(iv) for iv in out]


def covered(intervals) -> float:
    return sum(end - start for start, end in merged(intervals))


def overlap(a, b) -> float:
    """Time covered by both interval sets."""
    a, b = merged(a), merged(b)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_section(trace: dict, section: str) -> dict:
    """The GPU kernels that ran inside the CPU range ``section`` of a chrome trace: each kernel
    (name, stream, start/end µs from the first), and the overlap of the shared expert's kernels
    (everything that is not a preamble kernel) with the preamble's."""
    events = trace["traceEvents"]
    marks = [e for e in events if e.get("name") == section and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation"]
    if not marks:
        return {"error": f"no range {section!r} in the trace"}
    lo, hi = marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and lo <= e["ts"] <= hi), key=lambda e: e["ts"])
    if not kernels:
        return {"error": f"no kernels inside {section!r}"}
    t0 = kernels[0]["ts"]
    rows = [dict(name=e["name"][:80], stream=e.get("args", {}).get("stream", e.get("tid")),
                 start_us=round(e["ts"] - t0, 2), end_us=round(e["ts"] + e["dur"] - t0, 2), **launch_resources(e))
            for e in kernels]
    is_pre = [any(k in r["name"] for k in PREAMBLE_KERNELS) for r in rows]
    pre = [(r["start_us"], r["end_us"]) for r, p in zip(rows, is_pre) if p]
    shared = [(r["start_us"], r["end_us"]) for r, p in zip(rows, is_pre) if not p]
    return dict(kernels=rows, preamble_busy_us=round(covered(pre), 2), shared_busy_us=round(covered(shared), 2),
                overlap_us=round(overlap(pre, shared), 2), span_us=round(max(r["end_us"] for r in rows), 2),
                preamble_streams=sorted({r["stream"] for r, p in zip(rows, is_pre) if p}, key=str),
                shared_streams=sorted({r["stream"] for r, p in zip(rows, is_pre) if not p}, key=str))


def launch_resources(kernel_event: dict) -> dict:
    """What a kernel launch holds on an SM while resident, as the profiler recorded it: its programs
    (grid x), registers per thread and shared memory per program (bytes, static + dynamic). Kernels on
    two streams run side by side only where both fit on the SMs at once."""
    args = kernel_event.get("args", {})
    grid = args.get("grid")
    return dict(programs=grid[0] * grid[1] * grid[2] if grid else None, registers=args.get("registers per thread"),
                shared_bytes=args.get("shared memory"))


def profiled_sections(sections: Dict[str, Callable[[], None]], trace_path: str) -> Dict[str, dict]:
    """Each callable under the profiler in a CPU range of its name, synchronised; summarize_section of each."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for name, run in sections.items():
            with torch.profiler.record_function(name):
                run()
                torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        trace = json.load(f)
    return {name: summarize_section(trace, name) for name in sections}


def profile_overlap(fn: Callable, inputs: tuple, trace_path: str) -> Dict[str, dict]:
    """One eager call and one graph replay of fn under the profiler, each synchronised in its own range."""
    fn(*inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    return profiled_sections({"eager call": lambda: fn(*inputs), "graph replay": graph.replay}, trace_path)


# ----------------------------------------------------------------------------- run and report
def measure(spec: MoESpec, weights: Sequence[MoEWeights], M: int, device: torch.device, trace_path: str,
            shared_on: str, profiled: str = "pre+shared stream") -> dict:
    """One (dtype, M) row: µs per variant, the ratios, and the profile of one overlapped call. On the
    CPU each variant that needs no second stream is called once instead (no timing)."""
    block_m = layer.plan_layer(spec, M, device).expert_config.block_m
    on_gpu = device.type == "cuda"
    sets = with_weights(input_sets(spec, M, device, N_SETS if on_gpu else 1), weights)
    quantized = ({id(normed): reference.quantize_fp8_groups(normed) for _, normed, _ in sets}
                 if shared_on == "kernels-fp8" else {})
    row = dict(M=M, block_m=block_m, weight_copies=len(weights), local_experts_hit=local_experts_hit(spec, sets),
               us={})
    for name in VARIANTS:
        fn = variant_fn(name, spec, block_m, shared_on, quantized)
        if on_gpu:
            row["us"][name] = round(timing.graph_replay_us(fn, sets), 2)
        elif name not in ON_SIDE_STREAM:  # the side stream needs CUDA
            fn(*sets[0])
    if on_gpu:
        for ratio, numerator, denominator in RATIOS:
            row[ratio_key(ratio)] = round(row["us"][numerator] / row["us"][denominator], 3)
        row["profile"] = profile_overlap(variant_fn(profiled, spec, block_m, shared_on, quantized), sets[0],
                                         trace_path)
    return row


def markdown(result: dict) -> str:
    lines = [f"Shared expert ({result['shared_on']}) vs preamble overlap, {result['shape']}, "
             f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}. "
             f"µs per call under CUDA-graph replay (median of batches, {N_SETS} input sets rotated over "
             f"the row's copies of the preamble and shared-expert weights); "
             f"ratio = (pre+shared stream) / shared, target <= {TARGET_RATIO}.", "",
             "| experts | M | copies | local experts hit | " + " | ".join(VARIANTS)
             + "".join(f" | ratio {ratio}" for ratio, _, _ in RATIOS) + " | overlap (graph) |",
             "|---" * (len(VARIANTS) + len(RATIOS) + 5) + "|"]
    for r in result["rows"]:
        cells = [f"{r['us'][v]:.1f}" if r["us"].get(v) is not None else "-" for v in VARIANTS]
        prof = r.get("profile", {}).get("graph replay", {})
        ov = (f"{prof['overlap_us']:.1f} of {prof['preamble_busy_us']:.1f} µs preamble"
              if "overlap_us" in prof else "-")
        lines.append(f"| {r['dtype']} | {r['M']} | {r['weight_copies']} | {r['local_experts_hit']} | "
                     + " | ".join(cells) + "".join(f" | {r.get(ratio_key(ratio), '-')}" for ratio, _, _ in RATIOS)
                     + f" | {ov} |")
    first = next((r for r in result["rows"] if "profile" in r), None)
    if first:
        for section, prof in first["profile"].items():
            what = ("launched one by one from Python, so launch latency, not the GPU, sets the pace"
                    if section == "eager call" else "what the timings above measure")
            lines += ["", f"Kernels of one {result['profiled']} call, {first['dtype']} M={first['M']}, {section} "
                      f"({what}; "
                      f"µs from the first kernel; the chrome trace is overlap_trace.json):", ""]
            if "kernels" not in prof:
                lines.append(prof.get("error", "no kernels"))
                continue
            lines += ["| kernel | stream | start | end |", "|---|---|---|---|"]
            lines += [f"| {k['name'][:60]} | {k['stream']} | {k['start_us']:.1f} | {k['end_us']:.1f} |"
                      for k in prof["kernels"]]
            lines.append(f"\npreamble busy {prof['preamble_busy_us']} µs on streams {prof['preamble_streams']}, "
                         f"shared expert busy {prof['shared_busy_us']} µs on streams {prof['shared_streams']}, "
                         f"overlap {prof['overlap_us']} µs, span {prof['span_us']} µs.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--shared-on", choices=SHARED_ON, default="kernels",
                    help="the shared expert as its own launch of the expert kernels in the model dtype, "
                         "or in fp8 (MOE_FUSION_SHARED_FP8's; fp8 experts only)")
    ap.add_argument("--weight-copies", type=int, default=0,
                    help="copies of the preamble and shared-expert weights the input sets go round (default 0: "
                         f"enough to exceed L2 {L2_ROTATION_FACTOR} times; 1: one copy, partly timing the cache)")
    ap.add_argument("--profile", choices=VARIANTS, default="pre+shared stream", help="the variant profiled")
    ap.add_argument("--smoke", action="store_true", help="a tiny layer; on the CPU each variant once, no timing")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = "tiny-ep" if args.smoke else "dsv3-ep8"  # dsv3-ep8: the full dsv3 router, 32 of 256 experts local
    base = SHAPES[shape]
    if device.type != "cuda":  # the interpreter's bf16 dot is wrong; fp16 stands in
        base = base.replace(dtype="float16")
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  shape=shape, shared_on=args.shared_on, profiled=args.profile, spec=base.to_json(), rows=[])
    if args.shared_on == "kernels-fp8" and set(args.dtypes.split(",")) != {"fp8"}:
        ap.error("--shared-on kernels-fp8 needs --dtypes fp8 (an fp8 shared expert rides on fp8 experts)")
    t0 = time.time()
    scratch = tempfile.mkdtemp()
    for dtype in args.dtypes.split(","):
        spec = base.replace(quant=DTYPES[dtype])
        count = args.weight_copies or copies_out_of_l2(spec, args.shared_on == "kernels-fp8", device)
        weights = weight_copies(layer_weights(spec, device, seed=0), count)
        for M in (int(m) for m in args.m.split(",")):
            trace = os.path.join(scratch, f"{dtype}_{M}.json")
            row = dict(dtype=dtype, **measure(spec, weights, M, device, trace, args.shared_on, args.profile))
            result["rows"].append(row)
            if not os.path.exists(os.path.join(args.out, "overlap_trace.json")) and os.path.exists(trace):
                shutil.copy(trace, os.path.join(args.out, "overlap_trace.json"))
            prof = row.get("profile", {}).get("graph replay", {})
            print(f"[overlap] {dtype} M={M}: {row['us']} ratio stream {row.get('ratio_stream')} inline "
                  f"{row.get('ratio_inline')}; graph replay overlap {prof.get('overlap_us')} us of "
                  f"{prof.get('preamble_busy_us')} us preamble ({time.time() - t0:.0f} s)", flush=True)
        del weights
    shutil.rmtree(scratch)
    with open(os.path.join(args.out, "overlap.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "overlap.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
