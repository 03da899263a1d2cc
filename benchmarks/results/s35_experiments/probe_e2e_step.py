"""Session 35: why the real-size decode step's batch-1 speedup read 0.96x to 1.28x across runs.

e2e_decode.py times a step between two CUDA events around one synchronous model() call, so the
host's work before the first launch (guards, cudagraph-tree bookkeeping) counts as GPU idle time.
This probe separates the two, alternating Inductor and moe_fusion in rounds on one model:
- synced: e2e_decode's measure (median of 20 single steps);
- pipelined: 20 steps back to back, one event pair around them (the host runs ahead when it can);
- host: wall time of a model() call that returns before the GPU finishes;
- a profile of one step: kernels, graph launches, GPU busy time inside the step.

    PYTHONPATH=/tmp/site:$PWD python benchmarks/results/s35_experiments/probe_e2e_step.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from e2e_decode import REAL, _one_step_us  # noqa: E402

from moe_fusion import hf_models  # noqa: E402
from moe_fusion.backend import moe_fusion_backend  # noqa: E402


def pipelined_us(model, ids, steps=20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        model(ids, use_cache=False)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def host_us(model, ids) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    us = (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    return us


def profile_step(model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(ids, use_cache=False)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    runtime = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) if kernels else 0
    return {
        "kernels": len(kernels),
        "graph_launches": sum(e.name.startswith("cudaGraphLaunch") for e in runtime),
        "kernel_launches_outside_graphs": sum(e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel"))
                                              for e in runtime),
        "gpu_busy_us": sum(e.time_range.end - e.time_range.start for e in kernels),
        "gpu_span_us": span,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    model = hf_models.build_model("deepseek_v3", dtype=torch.bfloat16, device="cuda",
                                  **dict(REAL, num_hidden_layers=2, first_k_dense_replace=0))
    variants = {"inductor": torch.compile(model, mode="reduce-overhead"),
                "moe_fusion": torch.compile(model, backend=moe_fusion_backend, mode="reduce-overhead")}
    results = []
    with torch.no_grad():
        for batch in [int(b) for b in args.batch.split(",")]:
            ids = torch.randint(3, model.config.vocab_size, (batch, 1), device="cuda")
            for m in variants.values():
                for _ in range(4):
                    m(ids, use_cache=False)
            for rnd in range(args.rounds):
                for name, m in variants.items():
                    row = {"batch": batch, "round": rnd, "variant": name,
                           "synced_us": statistics.median(_one_step_us(m, ids) for _ in range(20)),
                           "pipelined_us": pipelined_us(m, ids),
                           "host_us": statistics.median(host_us(m, ids) for _ in range(10))}
                    results.append(row)
                    print(json.dumps(row), flush=True)
            for name, m in variants.items():
                prof = {"batch": batch, "variant": name, "profile": profile_step(m, ids)}
                results.append(prof)
                print(json.dumps(prof), flush=True)
    with open(f"{args.out}/probe_e2e_step.json", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
