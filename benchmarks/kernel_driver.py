"""Launches every Triton kernel of the project at small DeepSeek-V3-like shapes, through the public
entry points (layer.moe_layer, preamble.fused_preamble with the fused and the general plan,
experts.fused_experts), and checks each result against the reference. It is the program that
gpu_reliability.py runs under compute-sanitizer; the sizes are small so that the sanitizer's
instrumented launches stay fast.

    python benchmarks/kernel_driver.py [--smoke]

Prints one line per case, then "DRIVER OK" with the launches per kernel; exits 1 when a case fails
or a kernel of KERNELS was never launched. --smoke runs the first case only (the CPU test runs it
through the Triton interpreter, fp16 there because the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import traceback
from typing import Callable, Counter, Dict, Iterator, List, NamedTuple

import torch

# Without a GPU the kernels run through the interpreter; triton.jit reads this when the kernel
# modules are imported, below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

from triton.runtime.jit import KernelInterface  # noqa: E402

from layer_cases import expected_output, layer_options, layer_weights, recorded_parts, rel_err  # noqa: E402
from moe_fusion.lowering import experts, layer, preamble, reference  # noqa: E402
from moe_fusion.lowering.expert_configs import ExpertConfig, GemmTiles  # noqa: E402
from moe_fusion.spec import MoESpec  # noqa: E402
from moe_cases import dsv3_like  # noqa: E402
from preamble_checks import assert_routing_matches, check_preamble, one_launch_plan  # noqa: E402

# Every kernel a launch site of moe_fusion/lowering starts; a full run must launch each one.
KERNELS = ("_norm_quant_kernel", "_router_route_align_kernel", "_router_kernel", "_topk_kernel", "_align_kernel",
           "_align_parallel_kernel", "_route_align_kernel",
           "expert_gemm1_kernel", "gemm1_combine_kernel", "expert_gemm2_kernel", "fp8_act_quant_kernel",
           "fp8_weight_quant_kernel", "moe_finalize_kernel")
# Small tiles and both GEMMs split over K, so that the expert kernels' loops and split-K paths (GEMM1's
# with gemm1_combine_kernel) run more than once.
SPLIT_CONFIG = ExpertConfig(16, GemmTiles(32, 64, programs_per_sm=1, split_k=2),
                            GemmTiles(32, 64, split_k=2, programs_per_sm=1))
SPLIT_CONFIG_FP8 = ExpertConfig(16, GemmTiles(32, 128, programs_per_sm=1, split_k=2),
                                GemmTiles(32, 128, split_k=2, programs_per_sm=1))


class Case(NamedTuple):
    name: str
    run: Callable[[torch.device, str], str]  # (device, model dtype) -> a one-line result; raises on failure


def _dsv3_small(dtype: str, **changes) -> MoESpec:
    """dsv3's routing (8 groups, top-4 groups, top-8, sigmoid + bias, scale 2.5) at H 256, E 64, I 256."""
    base = dict(hidden_size=256, num_experts=64, n_group=8, topk_group=4, top_k=8, intermediate_size=256,
                shared_intermediate_size=256, dtype=dtype)
    base.update(changes)
    return dsv3_like(**base)


def _x(spec: MoESpec, M: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(M, spec.hidden_size, generator=g, device=device, dtype=spec.torch_dtype)


def _layer_case(M: int, deterministic: bool, shared_expert: str = "", **spec_changes) -> Callable[[torch.device, str], str]:
    """shared_expert: the strategy ("" = the side stream on CUDA, inline elsewhere)."""
    def run(device, dtype):
        spec = _dsv3_small(dtype, **spec_changes)
        w = layer_weights(spec, device, seed=M)
        x = _x(spec, M, device, seed=100 + M)
        shared = shared_expert or ("stream" if device.type == "cuda" else "inline")
        with layer_options(deterministic, shared), recorded_parts() as parts:
            out = layer.moe_layer(spec, x, w)
        pre = parts["preamble"]
        check_preamble(spec, x, w, pre, layer.plan_layer(spec, M, device).expert_config.block_m)
        err = rel_err(out, expected_output(spec, w, pre.normed, pre.topk_ids, pre.topk_weights,
                                           shared_fp8=spec.fp8 and shared == "fused"))
        tol = 3e-2 if spec.fp8 else 1e-2
        if not err < tol:
            raise AssertionError(f"layer output rel err {err:.2e} >= {tol}")
        return f"rel err {err:.1e} (tol {tol}), shared expert {shared}"
    return run


def _general_preamble_case(M: int, local_experts: int = 8) -> Callable[[torch.device, str], str]:
    """The planned (general) path: split-K router, standalone routing and alignment kernels (from 16
    tokens and 32 local experts the many-program alignment)."""
    def run(device, dtype):
        spec = _dsv3_small(dtype, num_local_experts=local_experts, quant="fp8_block")
        w = layer_weights(spec, device, seed=M)
        x = _x(spec, M, device, seed=M)
        plan = preamble.plan_preamble(spec, M, spec.torch_dtype, w.router_weight.dtype, device)
        if plan.fused or plan.route != "kernel" or plan.align != "kernel":
            raise AssertionError(f"expected the general kernel path at M={M}, planned {plan}")
        check_preamble(spec, x, w, preamble.fused_preamble(spec, x, w, block_m=16, plan=plan), 16)
        return "general path, outputs match the reference"
    return run


def _one_launch_preamble_case(M: int) -> Callable[[torch.device, str], str]:
    """Router + routing + alignment in one launch (the planner does not pick it: forced here)."""
    def run(device, dtype):
        spec = _dsv3_small(dtype, num_local_experts=8, quant="fp8_block")
        w = layer_weights(spec, device, seed=M)
        x = _x(spec, M, device, seed=M)
        plan = one_launch_plan(spec, M, device)
        check_preamble(spec, x, w, preamble.fused_preamble(spec, x, w, block_m=16, plan=plan), 16)
        return "one-launch path, outputs match the reference"
    return run


def _unaligned_preamble_case(M: int) -> Callable[[torch.device, str], str]:
    """The fused router without its alignment epilogue (what the moe_preamble op launches)."""
    def run(device, dtype):
        spec = _dsv3_small(dtype)
        w = layer_weights(spec, device, seed=M)
        x = _x(spec, M, device, seed=M)
        out = preamble.fused_preamble(spec, x, w, block_m=1, with_alignment=False)
        bias = w.correction_bias
        assert_routing_matches(spec, out.normed, w.router_weight, bias, out.topk_ids, out.topk_weights)
        return "fused router, no alignment: routing matches the reference"
    return run


def _experts_case(M: int, fp8: bool) -> Callable[[torch.device, str], str]:
    """fused_experts alone at odd sizes, the routing weight on the input (Llama4 style; fp8 then
    quantises the scaled input rows itself), GEMM2 split in two, atomic and deterministic."""
    def run(device, dtype):
        spec = MoESpec(hidden_size=200, num_experts=12, top_k=3, intermediate_size=136, weight_on="input",
                       dtype=dtype, quant="fp8_block" if fp8 else "none")
        w = layer_weights(spec, device, seed=M)
        x = _x(spec, M, device, seed=M)
        g = torch.Generator(device=device).manual_seed(M)
        ids = torch.stack([torch.randperm(spec.num_experts, generator=g, device=device)[:spec.top_k]
                           for _ in range(M)]).to(torch.int32)
        weights = 0.1 + torch.rand(M, spec.top_k, generator=g, device=device)
        ref_spec = spec if fp8 else spec.replace(dtype="float32")
        ref_w = w if fp8 else _float_experts(w)
        expected = reference.routed_experts(ref_spec, x if fp8 else x.float(), ids, weights, ref_w).double()
        errors = []
        for deterministic in (False, True):
            out = experts.fused_experts(spec, x, ids, weights, w, deterministic=deterministic,
                                        config=SPLIT_CONFIG_FP8 if fp8 else SPLIT_CONFIG)
            errors.append(rel_err(out, expected))
        tol = 1e-3 if fp8 else 1e-2
        if not max(errors) < tol:
            raise AssertionError(f"expert block rel err atomic {errors[0]:.2e}, deterministic {errors[1]:.2e} >= {tol}")
        return f"rel err atomic {errors[0]:.1e}, deterministic {errors[1]:.1e} (tol {tol})"
    return run


def _float_experts(w):
    out = type(w)(**vars(w))
    out.w_gate, out.w_up, out.w_down = w.w_gate.float(), w.w_up.float(), w.w_down.float()
    return out


CASES: List[Case] = [
    Case("layer M=1 atomic", _layer_case(1, deterministic=False)),
    Case("layer M=5 deterministic", _layer_case(5, deterministic=True)),
    Case("layer fp8 ep 8/64 M=3 atomic", _layer_case(3, deterministic=False, quant="fp8_block", num_local_experts=8)),
    Case("layer fp8 ep 8/64 M=7 deterministic", _layer_case(7, deterministic=True, quant="fp8_block",
                                                            num_local_experts=8)),
    Case("preamble general fp8 ep M=67", _general_preamble_case(67)),
    Case("preamble general fp8 M=40, 64 local experts", _general_preamble_case(40, local_experts=64)),
    Case("preamble fused without alignment M=2", _unaligned_preamble_case(2)),
    Case("preamble one launch fp8 ep M=3", _one_launch_preamble_case(3)),
    Case("layer shared expert fused M=3 atomic", _layer_case(3, deterministic=False, shared_expert="fused")),
    Case("layer fp8 ep shared expert fused M=5 deterministic",
         _layer_case(5, deterministic=True, shared_expert="fused", quant="fp8_block", num_local_experts=8)),
    Case("experts weight-on-input M=9", _experts_case(9, fp8=False)),
    Case("experts fp8 weight-on-input M=5", _experts_case(5, fp8=True)),
]


@contextlib.contextmanager
def counted_launches() -> Iterator[Counter[str]]:
    """Counts kernel[grid](...) launches by kernel name (compiled and interpreted kernels alike)."""
    counts: Counter[str] = collections.Counter()
    real_getitem = KernelInterface.__getitem__

    def getitem(self, grid):
        counts[self.fn.__name__] += 1
        return real_getitem(self, grid)

    KernelInterface.__getitem__ = getitem
    try:
        yield counts
    finally:
        KernelInterface.__getitem__ = real_getitem


def run_cases(cases: List[Case], device: torch.device) -> Dict[str, object]:
    """Runs each case (a failure does not stop the others); returns results and launch counts."""
    dtype = "bfloat16" if device.type == "cuda" else "float16"
    results = {}
    with counted_launches() as counts:
        for case in cases:
            try:
                results[case.name] = "ok: " + case.run(device, dtype)
            except Exception:  # noqa: BLE001 - reported per case, the run goes on
                results[case.name] = "FAILED: " + traceback.format_exc(limit=4).strip().splitlines()[-1]
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, in its own case
            print(f"[case] {case.name}: {results[case.name]}", flush=True)
    return {"results": results, "launches": dict(counts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the first case only")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = run_cases(CASES[:1] if args.smoke else CASES, device)
    failed = [name for name, r in report["results"].items() if not r.startswith("ok")]
    missing = [] if args.smoke else [k for k in KERNELS if k not in report["launches"]]
    launches = ", ".join(f"{k} x{n}" for k, n in sorted(report["launches"].items()))
    if failed or missing:
        print(f"DRIVER FAILED: cases {failed}, kernels never launched {missing}; launches: {launches}")
        return 1
    print(f"DRIVER OK {len(report['results'])} cases; launches: {launches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
