"""GPU run for the fused MoE preamble (issue 4): the preamble tests on the GPU, then the benchmark.

Benchmark: shapes dsv3, dsv3-ep8, qwen3-30b-a3b, mixtral (router side, bf16, RMSNorm fused in
front; dsv3 with fp8 activation quantisation) at M = 1..64. Each variant is timed under CUDA
graphs (moe_fusion.tools.timing.graph_replay_us) with inputs AND router weights rotated over
enough copies that the weights do not stay in L2, as in a model where the layers in between
flush it. Variants: the fused preamble, the plain-PyTorch reference preamble (reference.py:
norm + router + routing + fp8 quantisation + align_pairs) eager, and the same under
torch.compile (Inductor, default mode, dynamic M). Also: kernels per call, the router config
sweep for dsv3, per-kernel device time from the profiler, and the router GEMM without its
routing epilogue.

    python benchmarks/gpu_preamble.py --out DIR [--skip-tests] [--budget-s 400]
Writes DIR/preamble_h100.json, DIR/preamble_h100.md and DIR/tests.log; prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from moe_fusion.lowering import preamble  # noqa: E402
from moe_fusion.lowering.router_kernel import _router_kernel  # noqa: E402
from moe_fusion.spec import MoEWeights  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402
from preamble_checks import preamble_weights, real_shapes  # noqa: E402

MS = (1, 2, 4, 8, 16, 32, 64)
BLOCK_M = 16
ROTATE_BYTES = 160 << 20  # > 3x the H100's 50 MB L2
TARGET_US = {m: (8.0 if m <= 16 else 12.0) for m in MS}


def run_tests(out_dir: str, timeout_s: int, files=("tests/test_preamble_kernels.py", "tests/test_preamble_fused.py"),
              log_name="tests.log") -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        log, tail = proc.stdout + proc.stderr, (proc.stdout.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired as e:
        log, tail = str(e.stdout or "") + str(e.stderr or ""), f"TIMEOUT after {timeout_s}s"
    with open(os.path.join(out_dir, log_name), "w") as f:
        f.write(log)
    print(f"[tests] {' '.join(files)}: {tail} ({time.time() - t0:.0f}s)", flush=True)
    return tail


def weight_sets(spec, n_sets):
    sets = []
    for s in range(n_sets):
        w = preamble_weights(spec, "cuda", seed=s)
        sets.append((w.router_weight, w.norm_weight, w.correction_bias, w.expert_map))
    return sets


ONE_LAUNCH_MAX_M = 64


def input_sets(spec, M, wsets):
    g = torch.Generator().manual_seed(1000 + M)
    return [(torch.randn(M, spec.hidden_size, generator=g).to(spec.torch_dtype).cuda(), *ws) for ws in wsets]


def ours(spec, general=False, fused=False, pdl=True, **plan_overrides):
    """fused_preamble as planned; ``general`` / ``fused`` force the multi-launch path (router, routing,
    align) / the one-launch router+routing+alignment; ``pdl=False`` launches without PDL."""
    def fn(x, rw, nw, bias, emap):
        w = MoEWeights(router_weight=rw, w_gate=None, w_up=None, w_down=None, norm_weight=nw, correction_bias=bias,
                       expert_map=emap)
        plan = None
        if plan_overrides or general or fused:
            plan = preamble.plan_preamble(spec, x.shape[0], x.dtype, rw.dtype, x.device, **plan_overrides)
            if general or fused:
                plan.fused, plan.align = fused, "fused" if fused else "kernel"
                plan.router = preamble.router_config(x.shape[0], spec.num_experts, spec.hidden_size, False,
                                                     preamble._sm_count(0), fused, **plan_overrides)
        saved, preamble.USE_PDL = preamble.USE_PDL, pdl
        try:
            return preamble.fused_preamble(spec, x, w, BLOCK_M, emap, plan=plan)
        finally:
            preamble.USE_PDL = saved
    return fn


def fused_fits(spec, M) -> bool:
    """The one-launch path's router tile holds all rows in one row block."""
    return M <= ONE_LAUNCH_MAX_M


def reference_fn(spec):
    def fn(x, rw, nw, bias, emap):
        w = MoEWeights(router_weight=rw, w_gate=None, w_up=None, w_down=None, norm_weight=nw, correction_bias=bias,
                       expert_map=emap)
        return tuple(preamble.reference_preamble(spec, x, w, BLOCK_M, emap))
    return fn


def router_only_fn(spec):
    """The split-K router GEMM alone (no norm, no routing epilogue) on a given normed x; the
    accumulator is never re-zeroed (its values do not matter here), so one launch per call."""
    buffers = {}

    def fn(x, rw, nw, bias, emap):
        M = x.shape[0]
        plan = preamble.plan_preamble(spec, M, x.dtype, rw.dtype, x.device)
        cfg = plan.router
        if M not in buffers:
            buffers[M] = torch.zeros((M, spec.num_experts), dtype=torch.float32, device=x.device)
        logits = buffers[M]
        grid = (cfg.grid[0], cfg.grid[1], triton.cdiv(M, cfg.block_m))
        _router_kernel[grid](x, x.stride(0), rw, rw.stride(0), rw.stride(1), logits, logits.stride(0), M,
                             spec.num_experts, spec.hidden_size, cfg.k_per_program, BM=cfg.block_m, BE=cfg.block_e,
                             BK=cfg.block_k, DOT_FP32=False, PDL=False)
        return logits
    return fn


def kernel_times_us(fn, inputs, calls=20):
    """Mean device time per call of each kernel (eager launches, profiler)."""
    fn(*inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*inputs)
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:60]] = times.get(e.name[:60], 0.0) + e.device_time / calls
    return {k: round(v, 2) for k, v in times.items()}


def profile_dsv3(result):
    """Device time per kernel (profiler, eager launches without PDL) of the planned, the general and
    the one-launch paths, dsv3."""
    spec = real_shapes()["dsv3"]
    wsets = weight_sets(spec, 1)
    for M in (1, 2, 4, 16, 64):
        inputs = input_sets(spec, M, wsets)[0]
        times = {"planned": kernel_times_us(ours(spec, pdl=False), inputs),
                 "general": kernel_times_us(ours(spec, general=True, pdl=False), inputs)}
        if fused_fits(spec, M):
            times["one-launch"] = kernel_times_us(ours(spec, fused=True, pdl=False), inputs)
        result["kernel_times"][M] = times
        print(f"[profile] dsv3 M={M}: {times}", flush=True)


def warps_sweep(result):
    """dsv3 preamble under CUDA graphs for each (routing kernel warps, alignment kernel warps)."""
    spec = real_shapes()["dsv3"]
    wsets = weight_sets(spec, 16)
    result["warps"] = {}
    for M in (1, 4, 16, 64):
        inputs = input_sets(spec, M, wsets)
        for route_warps in (1, 2, 4):
            for align_warps in (2, 4, 8, 16):
                preamble.topk_kernel.ROUTE_WARPS = route_warps
                preamble.align_kernel.ALIGN_NUM_WARPS = preamble.align_kernel.ALIGN_NUM_WARPS_ABOVE_16 = align_warps
                us = timing.graph_replay_us(ours(spec), inputs)
                result["warps"][f"M={M} route={route_warps} align={align_warps}"] = round(us, 2)
        print(f"[warps] M={M}: {[(k, v) for k, v in result['warps'].items() if k.startswith(f'M={M} ')]}", flush=True)


def norm_chunk_sweep(result, spec, wsets):
    """The norm kernel alone (CUDA graphs) for several groups-of-128 per program (v5 splits a row
    over programs; 64 groups is one program per dsv3 row, as v4 was)."""
    from moe_fusion.lowering.norm_quant_kernel import norm_quant
    for M in (1, 16, 64):
        inputs = [(x, nw) for x, _, nw, _, _ in input_sets(spec, M, wsets)]
        for groups in (4, 8, 16, 64):
            us = timing.graph_replay_us(lambda x, nw: norm_quant(x, nw, spec.rms_norm_eps, True, chunk_groups=groups),
                                        inputs)
            result.setdefault("norm_chunks", {})[f"M={M} groups={groups}"] = round(us, 2)
    print(f"[norm chunks] {result['norm_chunks']}", flush=True)


def logit_rounding_diag():
    """Why bf16-router shapes fail at M = 1500 (GPU run v3): how far the kernel's and cuBLAS's logits
    are from the exactly rounded ones, and where weights differ from the reference."""
    from moe_fusion.lowering import reference
    out = {}
    for name in ("qwen3-30b-a3b", "mixtral"):
        spec = real_shapes()[name]
        w = preamble_weights(spec, "cuda", seed=0)
        x = torch.randn(1500, spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(spec.torch_dtype).cuda()
        got = preamble.fused_preamble(spec, x, w, BLOCK_M)
        normed, W = got.normed, w.router_weight
        exact = normed.double() @ W.double().T
        mags = normed.double().abs() @ W.double().abs().T
        rounded_exact = exact.to(torch.bfloat16).double()
        d = {}
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
            cublas = reference.router_logits(spec, normed, W).double()
            d[f"cublas_vs_exactly_rounded_reducedprec={flag}"] = int((cublas != rounded_exact).sum())
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        fp32_sum = (normed.float() @ W.float().T).double()
        d["fp32_err_over_sum_abs_max"] = float(((fp32_sum - exact).abs() / mags).max())
        d["fp32_err_over_abs_max"] = float(((fp32_sum - exact).abs() / exact.abs()).max())
        ref_logits = reference.router_logits(spec, normed, W)
        ref_ids, ref_w = reference.select_experts(spec, ref_logits)
        bad = ~torch.isclose(got.topk_weights, ref_w.float(), rtol=1e-5, atol=1e-6)
        d["weights_off"] = int(bad.sum())
        d["ids_off_rows"] = int((got.topk_ids != ref_ids).any(-1).sum())
        rows = bad.any(-1).nonzero().flatten()[:8]
        if rows.numel():
            # the worst logit of those rows: distance to a bf16 rounding boundary over the sum of |products|
            ex = exact[rows]
            lo, hi = ex.to(torch.bfloat16).double(), None
            step = (ex.abs().clamp(min=1e-30).log2().floor() - 7).exp2()
            mid_dist = ((ex - lo).abs() - step / 2).abs()
            d["bad_rows_min_boundary_dist_over_sum_abs"] = [float(v) for v in (mid_dist / mags[rows]).min(-1).values]
            d["bad_rows_min_boundary_dist_rel"] = [float(v) for v in (mid_dist / ex.abs()).min(-1).values]
        out[name] = d
        print(f"[diag] {name}: {d}", flush=True)
    return out


def save(out_dir, result):
    with open(os.path.join(out_dir, "preamble_h100.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "preamble_h100.md"), "w") as f:
        f.write(markdown(result))


def markdown(result) -> str:
    lines = [f"Fused MoE preamble vs the reference preamble, {result['device']}, torch {result['torch']}, "
             f"triton {result['triton']}, {result['date']}. Time per call in us under CUDA graphs (inputs and "
             f"router weights rotated past L2); kernels per call in brackets. Copy bandwidth "
             f"{result['copy_bw_TBps']:.2f} TB/s. Target (dsv3): <= 8 us for M <= 16, <= 12 us at M = 64.", "",
             "| shape | M | fused_preamble (us) | general forced (us) | one-launch epilogue forced (us) | "
             "no PDL (us) | eager (us) | Inductor (us) | router weight / bw floor (us) | planned path |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    opt = lambda r, key: "-" if r.get(key) is None else f"{r[key]:.1f}"
    for r in result["rows"]:
        ind = "-" if r.get("inductor_us") is None else f"{r['inductor_us']:.1f} [{r.get('inductor_kernels', '?')}]"
        eager = "-" if r.get("eager_us") is None else f"{r['eager_us']:.1f} [{r['eager_kernels']}]"
        lines.append(f"| {r['shape']} | {r['M']} | {r['fused_us']:.1f} [{r['fused_kernels']}] | "
                     f"{r['general_us']:.1f} [{r['general_kernels']}] | {opt(r, 'fused_forced_us')} | "
                     f"{opt(r, 'nopdl_us')} | {eager} | {ind} | {r['floor_us']:.2f} | {r['path']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="dsv3 router tiling sweep and per-part times")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--tests-timeout-s", type=int, default=170)
    ap.add_argument("--random-tests-timeout-s", type=int, default=0, help="also run tests/test_random_preamble.py")
    ap.add_argument("--no-baselines", action="store_true", help="skip the eager and Inductor baselines")
    ap.add_argument("--shapes", default="", help="comma-separated subset of the shapes")
    ap.add_argument("--profile-only", action="store_true", help="only the per-kernel device times (dsv3)")
    ap.add_argument("--diag", action="store_true", help="bf16-router logit rounding diagnostics at M = 1500")
    ap.add_argument("--warps-sweep", action="store_true", help="only: dsv3 preamble time per routing / alignment warps")
    args = ap.parse_args()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    result = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  block_m=BLOCK_M, rows=[], sweep=[], kernel_times={}, router_only={})
    if args.warps_sweep:
        warps_sweep(result)
        with open(os.path.join(args.out, "warps.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.profile_only:
        profile_dsv3(result)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    result["tests"] = "skipped" if args.skip_tests else run_tests(args.out, args.tests_timeout_s)
    if args.random_tests_timeout_s:
        result["random_tests"] = run_tests(args.out, args.random_tests_timeout_s, ("tests/test_random_preamble.py",),
                                           "random_tests.log")
    if args.diag:
        result["diag"] = logit_rounding_diag()
    result["copy_bw_TBps"] = timing.copy_bandwidth_bytes_per_s() / 1e12
    bw = result["copy_bw_TBps"] * 1e12
    print(f"[bench] copy bandwidth {result['copy_bw_TBps']:.2f} TB/s", flush=True)

    shapes = real_shapes()
    wsets_by_shape = {}
    for name, spec in shapes.items():
        if args.shapes and name not in args.shapes.split(","):
            continue
        wbytes = spec.num_experts * spec.hidden_size * spec.torch_dtype.itemsize
        n_sets = max(4, min(64, -(-ROTATE_BYTES // wbytes)))
        wsets_by_shape[name] = weight_sets(spec, n_sets)
        for M in MS:
            inputs = input_sets(spec, M, wsets_by_shape[name])
            plan = preamble.plan_preamble(spec, M, spec.torch_dtype, spec.torch_dtype, inputs[0][0].device)
            row = dict(shape=name, M=M, sets=n_sets, path="fused" if plan.fused else "general",
                       router_cfg=dict(grid=plan.router.grid, block_e=plan.router.block_e, block_k=plan.router.block_k),
                       router_weight_bytes=wbytes, floor_us=wbytes / bw * 1e6)
            row["fused_us"] = timing.graph_replay_us(ours(spec), inputs)
            row["fused_kernels"] = timing.kernels_per_call(ours(spec), inputs[0])
            row["general_us"] = timing.graph_replay_us(ours(spec, general=True), inputs)
            row["general_kernels"] = timing.kernels_per_call(ours(spec, general=True), inputs[0])
            if not plan.fused and fused_fits(spec, M):
                row["fused_forced_us"] = timing.graph_replay_us(ours(spec, fused=True), inputs)
            if name == "dsv3":
                row["nopdl_us"] = timing.graph_replay_us(ours(spec, pdl=False), inputs)
            if not args.no_baselines:
                row["eager_us"] = timing.graph_replay_us(reference_fn(spec), inputs)
                row["eager_kernels"] = timing.kernels_per_call(reference_fn(spec), inputs[0])
            row["bw_fraction"] = row["floor_us"] / row["fused_us"]
            result["rows"].append(row)
            print(f"[bench] {name} M={M}: fused {row['fused_us']:.2f} us [{row['fused_kernels']}], general "
                  f"{row['general_us']:.2f} us [{row['general_kernels']}], forced one-launch "
                  f"{row.get('fused_forced_us')}, no PDL {row.get('nopdl_us')}, eager {row.get('eager_us')}",
                  flush=True)
        save(args.out, result)

    # Where the time goes: device time per kernel (profiler, eager launches) for dsv3.
    for M in (1, 4, 16, 64):
        inputs = input_sets(shapes["dsv3"], M, wsets_by_shape["dsv3"][:1])
        result["kernel_times"][M] = kernel_times_us(ours(shapes["dsv3"], pdl=False), inputs[0])
        if fused_fits(shapes["dsv3"], M):
            result["kernel_times"][f"{M}-one-launch"] = kernel_times_us(ours(shapes["dsv3"], fused=True, pdl=False),
                                                                        inputs[0])
        print(f"[profile] dsv3 M={M}: {result['kernel_times'][M]} one-launch: "
              f"{result['kernel_times'].get(f'{M}-one-launch')}", flush=True)
    norm_chunk_sweep(result, shapes["dsv3"], wsets_by_shape["dsv3"])
    save(args.out, result)
    if args.no_baselines:
        args.budget_s = 0

    # Inductor baseline: compiles are slow; skip what does not fit the budget.
    for name, spec in shapes.items():
        if time.time() - t_start > args.budget_s - 60:
            print(f"[inductor] {name}: skipped, out of time", flush=True)
            continue
        torch._dynamo.reset()
        compiled = torch.compile(reference_fn(spec), dynamic=True)
        for row in (r for r in result["rows"] if r["shape"] == name):
            if time.time() - t_start > args.budget_s - 20:
                break
            try:
                inputs = input_sets(spec, row["M"], wsets_by_shape[name])
                row["inductor_us"] = timing.graph_replay_us(compiled, inputs)
                row["inductor_kernels"] = timing.kernels_per_call(compiled, inputs[0])
            except Exception as e:  # recorded, never hidden
                row["inductor_error"] = repr(e)[:300]
                print(f"[inductor] {name} M={row['M']}: {row['inductor_error']}", flush=True)
                break
            print(f"[inductor] {name} M={row['M']}: {row['inductor_us']:.1f} us [{row['inductor_kernels']}]", flush=True)
        save(args.out, result)

    # dsv3: router tiling sweep, per-kernel device time, and the router GEMM alone.
    if not args.sweep:
        print(markdown(result))
        print(f"tests: {result['tests']}; total {time.time() - t_start:.0f}s")
        return
    spec, wsets = shapes["dsv3"], wsets_by_shape["dsv3"]
    for M in (1, 4, 16, 64):
        inputs = input_sets(spec, M, wsets)
        for block_k, per_sm, warps in ((64, 1, 4), (64, 2, 4), (128, 1, 4), (128, 2, 4), (64, 2, 8), (128, 2, 8),
                                       (64, 4, 4), (32, 2, 4)):
            try:
                us = timing.graph_replay_us(ours(spec, fused=fused_fits(spec, M), block_k=block_k,
                                                 programs_per_sm=per_sm, num_warps=warps), inputs)
            except Exception as e:  # e.g. out of shared memory: recorded, not hidden
                us = repr(e)[:120]
            result["sweep"].append(dict(M=M, block_k=block_k, programs_per_sm=per_sm, num_warps=warps, us=us,
                                        fused=fused_fits(spec, M)))
        logits_sets = [(torch.randn(M, spec.num_experts, device="cuda"), b, e) for _, _, _, b, e in inputs]
        result.setdefault("routing_alone", {})[M] = timing.graph_replay_us(
            lambda lg, b, e: preamble.topk_kernel.select_experts(spec, lg, b, torch.bfloat16), logits_sets)
        ids_sets = [(torch.stack([torch.randperm(spec.num_experts, device="cuda")[:spec.top_k] for _ in range(M)])
                     .to(torch.int32),) for _ in range(8)]
        result.setdefault("align_alone", {})[M] = timing.graph_replay_us(
            lambda ids: preamble.align_kernel.align_pairs(ids, None, spec.num_local_experts, BLOCK_M), ids_sets)
        normed_inputs = [(preamble.reference.rms_norm(x, nw, spec.rms_norm_eps), rw, nw, b, e)
                         for x, rw, nw, b, e in inputs]
        result["router_only"][M] = timing.graph_replay_us(router_only_fn(spec), normed_inputs)
        print(f"[sweep] M={M}: {[(s['block_k'], s['programs_per_sm'], s['num_warps'], s['us']) for s in result['sweep'] if s['M'] == M]}"
              f", router GEMM alone {result['router_only'][M]:.2f} us, routing alone {result['routing_alone'][M]:.2f}"
              f" us, align alone {result['align_alone'][M]:.2f} us, kernels {result['kernel_times'][M]}", flush=True)
    save(args.out, result)

    print(markdown(result))
    print(f"tests: {result['tests']}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
