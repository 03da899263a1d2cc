"""The whole MoE layer on the GPU: the plan for (spec, M, device), then

    main stream:  norm (+fp8 quant) ─▶ router + routing + alignment ─▶ GEMM1 ─▶ GEMM2 ─▶ + shared
    side stream:                 └─▶ shared expert (expert kernels, preallocated buffers) ─────┘

The shared expert needs only the normed hidden states, so it forks right after the norm and
overlaps the routing chain and the routed experts (strategy "stream"); "inline" runs it on the
main stream after the routed experts; "fused" computes it in the routed experts' GEMM launches,
as extra experts every token selects (experts.SharedTail; with fp8 experts it is computed in
fp8 from block-quantised copies of its weights). A separate shared expert runs as a launch of the
expert kernels of its own: in the model dtype, or, with fp8 experts and LoweringOptions.shared_fp8,
in fp8 (shared_expert.py). Inline it may instead run on cuBLAS in the model dtype ("inline"; the
measured plan picks "inline-kernels" where that is faster). On the side stream it always runs on
the expert kernels ("stream" and "stream-kernels" are the same): cuBLAS allocates its workspace
lazily per stream, which the side stream must not do (streams.py); with cuBLAS there the benchmark
of session 17 stopped on illegal addresses in 4 of 6 runs after CUDA graphs were captured and freed,
and in none without cuBLAS's workspace or with the expert kernels (benchmarks/results/session17.md).
"stream-late" forks the side stream's shared GEMM2 only once the routed GEMM1 is queued: it then
streams beside the routed combine and GEMM2, where the HBM has room, instead of beside the routed
GEMM1 on the critical path (dsv3-ep8 fp8 with the fp8 shared expert, 14 bench seeds at the expected
routing: 1.0 µs faster at M = 1, 0.7-1.4 µs at M = 4; benchmarks/results/session19.md).
Semantics: reference.moe_layer (an fp8 shared expert: reference.shared_experts_fp8 for the shared part).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..spec import MoESpec, MoEWeights
from . import experts, preamble, shared_plan, streams
from .expert_configs import ExpertConfig
from .layer_output_kernel import layer_output
from .shared_expert import CublasSharedExpert, SharedExpertOnExpertKernels

SHARED_STRATEGIES = shared_plan.STRATEGIES
ON_KERNELS = "-kernels"  # a separate shared expert as its own launch of the expert kernels, not cuBLAS
LATE = "-late"  # "stream-late": the side stream's shared GEMM2 forks after the routed GEMM1 (module doc)
# The plan's choice on CUDA where shared_plan.json (measured per device and shape) has no entry:
# "fused" up to this M (bf16 experts), "stream" above. Measured on the H100 at dsv3-ep8
# (benchmarks/experts_notes.md, run 5): fused was 5-31% faster at M <= 16, 5% slower at M = 64
# (the dense tail reads the shared weights once per 16-token tile).
FUSED_SHARED_MAX_M = 16
log = logging.getLogger("moe_fusion.lowering")
_refused_tail: set = set()


@dataclass
class LoweringOptions:
    """Process-wide choices that do not change what the layer computes, except where they say so.

    deterministic: the same bits on every run: the router without split-K atomics, the expert
        block with a fixed-order reduction.
    shared_expert: one of SHARED_STRATEGIES, or None to let the plan choose.
    shared_fp8: with fp8 experts, compute the shared expert in fp8 too (from block-quantised
        copies of its weights), whatever the strategy; "fused" always does.
    """

    deterministic: bool = os.environ.get("MOE_FUSION_DETERMINISTIC", "0") == "1"
    shared_expert: Optional[str] = os.environ.get("MOE_FUSION_SHARED_EXPERT") or None
    shared_fp8: bool = os.environ.get("MOE_FUSION_SHARED_FP8", "0") == "1"


options = LoweringOptions()


@dataclass(frozen=True)
class LayerPlan:
    expert_config: ExpertConfig
    shared_expert: str  # "stream" | "inline" | "fused" | "none"
    deterministic: bool
    # The shared expert is computed in fp8 (reference.shared_experts_fp8): "fused" with fp8 experts,
    # or "stream"/"inline" as a launch of the fp8 expert kernels of its own when asked for.
    shared_fp8: bool = False
    # A separate ("stream"/"inline") shared expert runs as its own launch of the expert kernels
    # (always on the side stream or in fp8), not on cuBLAS.
    shared_on_kernels: bool = False
    # "stream" only: the side stream's shared GEMM2 waits for the routed GEMM1 ("stream-late").
    shared_gemm2_late: bool = False

    def __post_init__(self):
        if self.shared_expert == "stream" and not self.shared_on_kernels:
            raise ValueError("a shared expert on the side stream runs on the expert kernels: cuBLAS would "
                             "allocate its workspace on that stream (streams.py)")
        if self.shared_gemm2_late and self.shared_expert != "stream":
            raise ValueError("only a shared expert on the side stream can start its GEMM2 late")


def plan_layer(spec: MoESpec, m: int, device: torch.device) -> LayerPlan:
    spec = spec.as_run()
    strategy = _shared_strategy(spec, m, device)
    shared = strategy.replace(ON_KERNELS, "").replace(LATE, "")
    separate = shared in ("stream", "inline")
    fp8 = spec.fp8 and shared == "fused" or separate and _fp8_shared_allowed(spec)
    on_kernels = separate and (fp8 or strategy.endswith(ON_KERNELS) or shared == "stream")
    return LayerPlan(experts.expert_config(spec, m, device), shared, options.deterministic, fp8, on_kernels,
                     strategy.endswith(LATE))


def _fp8_shared_allowed(spec: MoESpec) -> bool:
    """fp8 experts, the user asked for an fp8 shared expert, and the expert kernels can take it."""
    return spec.fp8 and options.shared_fp8 and experts.shared_tail_problem(spec) is None


def _shared_strategy(spec: MoESpec, m: int, device: torch.device) -> str:
    if not spec.has_shared_experts:
        return "none"
    tail_problem = experts.shared_tail_problem(spec)
    # The side stream needs CUDA (the interpreter runs everything in order) and the expert kernels.
    separate = "stream" if device.type == "cuda" and tail_problem is None else "inline"
    if options.shared_expert is None and device.type == "cuda":
        fp8_shared = _fp8_shared_allowed(spec)
        measured = shared_plan.lookup(spec, m, experts.device_facts(device)[0], fp8_shared=fp8_shared)
        if measured is not None and (not _needs_tail(measured) or tail_problem is None):
            return measured
        # fp8 experts compute a fused shared expert in fp8: only when asked for.
        fits = (not spec.fp8 or fp8_shared) and m <= FUSED_SHARED_MAX_M
        return "fused" if fits and tail_problem is None else separate
    shared = options.shared_expert or separate
    if shared not in SHARED_STRATEGIES:
        raise ValueError(f"shared_expert strategy {shared!r}; expected one of {SHARED_STRATEGIES}")
    if shared.startswith("stream") and device.type != "cuda":  # no second stream: the same work in order
        shared = "inline-kernels" if tail_problem is None else "inline"
    if _needs_tail(shared) and tail_problem:
        if (spec.to_json(), shared) not in _refused_tail:
            _refused_tail.add((spec.to_json(), shared))
            log.warning("moe_fusion: shared expert 'inline' instead of %r: %s", shared, tail_problem)
        return "inline"
    return shared


def _needs_tail(strategy: str) -> bool:
    """The strategy runs the shared expert on the expert kernels (experts.shared_tail): fused, on the
    side stream, or by name."""
    return strategy.replace(LATE, "") in ("fused", "stream") or strategy.endswith(ON_KERNELS)


def _shared_weights_in_model_dtype(spec: MoESpec, plan: LayerPlan) -> tuple:
    """The shared weights that must come in the hidden states' dtype: all of them on cuBLAS or in a
    bf16/fp16 expert launch; only the gate where the experts run on fp8 copies (made from any dtype)."""
    gate = ("shared_expert_gate",) if spec.shared_gate else ()
    return gate if plan.shared_fp8 else gate + ("shared_gate", "shared_up", "shared_down")


def moe_layer(spec: MoESpec, x: torch.Tensor, w: MoEWeights, plan: Optional[LayerPlan] = None) -> torch.Tensor:
    """reference.moe_layer on the kernels; raises preamble/experts.Unsupported before any launch
    it cannot make."""
    spec, w = experts.with_fp8_experts(spec, w)
    plan = plan or plan_layer(spec, x.shape[0], x.device)
    normed_dtype = preamble.normed_dtype_of(spec, x, w)
    if normed_dtype not in experts.MODEL_DTYPES:  # checked here, before the preamble launches anything
        raise experts.Unsupported(f"model dtype {normed_dtype}: the expert kernels take bf16/fp16 activations")
    separate = plan.shared_expert in ("stream", "inline")
    if spec.has_shared_experts:  # the dtypes the shared expert's kernels take, checked before any launch
        for name in _shared_weights_in_model_dtype(spec, plan):
            if getattr(w, name).dtype != x.dtype:
                raise experts.Unsupported(f"shared expert weight {name} is {getattr(w, name).dtype}, "
                                          f"hidden states {x.dtype}")
    tail = experts.shared_tail(spec, w) if plan.shared_expert == "fused" else None
    separate_shared = []

    def start_shared_gemm2() -> None:
        """The side stream's shared GEMM2, after the routed GEMM1 (beside the routed GEMM2)."""
        streams.fork(x.device, separate_shared[0].run_gemm2)

    def start_shared_expert(normed: torch.Tensor, x_fp8: torch.Tensor, x_scale: torch.Tensor) -> None:
        """Allocate (on this stream), then run on the side stream ("stream") or later ("inline")."""
        if plan.shared_on_kernels:
            job = SharedExpertOnExpertKernels(spec, normed, x_fp8, x_scale, w, plan.shared_fp8, plan.deterministic)
        else:
            job = CublasSharedExpert(spec, normed, w)
        separate_shared.append(job)
        if plan.shared_expert == "stream":
            streams.fork(x.device, job.run_gemm1 if plan.shared_gemm2_late else job.run)

    pre = preamble.fused_preamble(spec, x, w, block_m=plan.expert_config.block_m,
                                  after_norm=start_shared_expert if separate else None,
                                  deterministic=plan.deterministic)
    quantized = spec.fp8 and pre.x_fp8.numel() > 0
    out = experts.fused_experts(
        spec, pre.normed, pre.topk_ids, pre.topk_weights, w,
        x_fp8=pre.x_fp8 if quantized else None, x_scale=pre.x_scale if quantized else None,
        alignment=(pre.sorted_pair_ids, pre.tile_expert, pre.num_tiles),
        deterministic=plan.deterministic, config=plan.expert_config, shared=tail,
        after_gemm1=start_shared_gemm2 if plan.shared_gemm2_late else None,
    )
    pdl = experts.pdl_mode(x.device, x.shape[0]) != "off"
    if not separate_shared:
        return layer_output(out, None, x.dtype, pdl)
    if plan.shared_expert == "stream":
        streams.join(x.device)
    else:
        separate_shared[0].run()
    return layer_output(out, separate_shared[0].out, x.dtype, pdl)
