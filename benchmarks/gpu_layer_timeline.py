"""Where one whole-layer call spends its time: the kernels of one CUDA-graph replay under the
profiler, each with its stream and start/end µs from the first kernel, and the graph time of the
call (moe_fusion.tools.timing, inputs rotated). The plan is the layer's, as the MOE_FUSION_*
environment sets it (e.g. MOE_FUSION_SHARED_EXPERT=stream MOE_FUSION_SHARED_FP8=1).

    python benchmarks/gpu_layer_timeline.py [--shape dsv3-ep8] [--dtype fp8] [--m 1,4] [--out DIR] [--resources]

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
from moe_fusion.lowering import layer  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402


def timeline(spec, w, M: int, device: torch.device) -> dict:
    sets = input_sets(spec, M, device, 8)
    plan = layer.plan_layer(spec, M, device)

    def call(x, normed):
        layer.moe_layer(spec, x, w, plan)

    us = timing.graph_replay_us(call, sets)
    with tempfile.TemporaryDirectory() as scratch:
        replay = profile_overlap(call, sets[0], os.path.join(scratch, "trace.json"))["graph replay"]
    return dict(M=M, us=round(us, 2), shared_expert=plan.shared_expert, shared_fp8=plan.shared_fp8,
                config=plan.expert_config.to_dict(), kernels=replay.get("kernels", replay.get("error")))


def report(row: dict) -> str:
    lines = [f"M={row['M']}: {row['us']} µs per call; shared expert {row['shared_expert']} "
             f"(fp8: {row['shared_fp8']}); experts {row['config']}",
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
    ap.add_argument("--out", default="", help="also write timeline_<shape>_<dtype>.json here")
    ap.add_argument("--resources", action="store_true", help="list the compiled kernels' registers and shared memory")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    spec = SHAPES[args.shape].replace(quant=DTYPES[args.dtype])
    w = layer_weights(spec, device)
    rows = [timeline(spec, w, int(m), device) for m in args.m.split(",")]
    for row in rows:
        print(report(row), flush=True)
    if args.resources:
        for r in kernel_resources():
            print(f"{r['kernel']:32s} regs {r['regs']:4d} spills {r['spills']:3d} shared {r['shared']:7d} B "
                  f"warps {r['warps']}")
    if args.out:
        with open(os.path.join(args.out, f"timeline_{args.shape}_{args.dtype}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
