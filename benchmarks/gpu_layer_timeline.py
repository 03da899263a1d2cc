"""Where one whole-layer call spends its time: the kernels of one CUDA-graph replay under the
profiler, each with its stream and start/end µs from the first kernel, and the graph time of the
call (moe_fusion.tools.timing, inputs rotated). The plan is the layer's, as the MOE_FUSION_*
environment sets it (e.g. MOE_FUSION_SHARED_EXPERT=stream MOE_FUSION_SHARED_FP8=1).

    python benchmarks/gpu_layer_timeline.py [--shape dsv3-ep8] [--dtype fp8] [--m 1,4] [--part layer|experts|preamble]
        [--out DIR] [--resources]

--part preamble: the preamble alone (norm, router, routing, alignment: what issue 4 times).

--part experts: the routed-expert block alone (dispatch.routed_experts, as the bench's "experts" part
calls it: alignment and x quantisation included) on the preamble's routings of the same inputs; the
profiled call is a routing that reaches exactly one local expert where the sets have one.

--resources also lists each compiled Triton kernel's registers per thread, spills, shared memory and
warps: what decides how many of its programs fit on an SM beside the other stream's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu_overlap import DTYPES, input_sets, profile_overlap  # noqa: E402
from layer_cases import layer_weights  # noqa: E402
from moe_fusion.lowering import dispatch, layer, preamble  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402
from moe_fusion.tools.bench import distinct_local_experts  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402


def timeline(spec, w, M: int, device: torch.device, part: str = "layer") -> dict:
    sets = input_sets(spec, M, device, 8)
    plan = layer.plan_layer(spec, M, device)
    profiled = sets[0]
    hits = None
    if part == "layer":
        def call(x, normed):
            layer.moe_layer(spec, x, w, plan)
    elif part == "preamble":
        def call(x, normed):
            preamble.fused_preamble(spec, x, w, block_m=plan.expert_config.block_m)
    else:
        sets, hits = routed_sets(spec, w, sets, plan.expert_config.block_m)
        # Profile a routing that reaches exactly one local expert where there is one (M = 1's usual case).
        profiled = next((s for s, n in zip(sets, hits) if n == 1), sets[0])

        def call(normed, ids, weights):
            dispatch.routed_experts(spec, normed, ids, weights, w)

    us = timing.graph_replay_us(call, sets)
    with tempfile.TemporaryDirectory() as scratch:
        replay = profile_overlap(call, profiled, os.path.join(scratch, "trace.json"))["graph replay"]
    return dict(M=M, part=part, us=round(us, 2), shared_expert=plan.shared_expert, shared_fp8=plan.shared_fp8,
                config=plan.expert_config.to_dict(), local_experts_hit=hits,
                kernels=replay.get("kernels", replay.get("error")))


def routed_sets(spec, w, sets, block_m: int):
    """(normed, ids, weights) of each input set as the preamble routes it, and the local experts each reaches."""
    routed, hits = [], []
    for x, _ in sets:
        pre = preamble.fused_preamble(spec, x, w, block_m=block_m)
        routed.append((pre.normed, pre.topk_ids, pre.topk_weights))
        hits.append(distinct_local_experts(spec, pre.topk_ids, w.expert_map))
    return routed, hits


def report(row: dict) -> str:
    what = {"layer": f"shared expert {row['shared_expert']} (fp8: {row['shared_fp8']})",
            "preamble": "preamble alone (preamble.fused_preamble)"}.get(
        row["part"], f"expert block alone (dispatch.routed_experts), local experts hit per set {row['local_experts_hit']}")
    lines = [f"M={row['M']}: {row['us']} µs per call; {what}; experts {row['config']}",
             f"{'start':>7} {'end':>7} {'dur':>6}  stream  kernel"]
    for k in row["kernels"] if isinstance(row["kernels"], list) else []:
        lines.append(f"{k['start_us']:7.1f} {k['end_us']:7.1f} {k['end_us'] - k['start_us']:6.1f}  "
                     f"{str(k['stream']):>6}  {k['name'][:70]}")
    return "\n".join(lines)


def kernel_resources() -> list:
    """Registers, spills, shared memory and warps of every Triton kernel of moe_fusion.lowering
    compiled in this process (one row per specialisation)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import moe_fusion.lowering as lowering
    rows = []
    for info in pkgutil.iter_modules(lowering.__path__):
        module = importlib.import_module(f"moe_fusion.lowering.{info.name}")
        for name, fn in vars(module).items():
            if not isinstance(fn, JITFunction) or fn.__module__ != module.__name__:
                continue
            for caches in fn.device_caches.values():
                for kernel in caches[0].values():
                    kernel._init_handles()
                    rows.append(dict(kernel=name, regs=kernel.n_regs, spills=kernel.n_spills,
                                     shared=kernel.metadata.shared, warps=kernel.metadata.num_warps))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="dsv3-ep8")
    ap.add_argument("--dtype", default="fp8", choices=list(DTYPES))
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--part", choices=("layer", "experts", "preamble"), default="layer",
                    help="the whole layer, the routed-expert block alone on the preamble's routings, or the preamble alone")
    ap.add_argument("--out", default="", help="also write timeline_<shape>_<dtype>.json here")
    ap.add_argument("--resources", action="store_true", help="list the compiled kernels' registers and shared memory")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    spec = SHAPES[args.shape].replace(quant=DTYPES[args.dtype])
    w = layer_weights(spec, device)
    rows = [timeline(spec, w, int(m), device, args.part) for m in args.m.split(",")]
    for row in rows:
        print(report(row), flush=True)
    if args.resources:
        for r in kernel_resources():
            print(f"{r['kernel']:32s} regs {r['regs']:4d} spills {r['spills']:3d} shared {r['shared']:7d} B "
                  f"warps {r['warps']}")
    if args.out:
        with open(os.path.join(args.out, f"timeline_{args.part}_{args.shape}_{args.dtype}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
