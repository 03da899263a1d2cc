"""The whole MoE layer on the GPU: the plan for (spec, M, device), then

    main stream:  norm (+fp8 quant) ─▶ router + routing + alignment ─▶ GEMM1 ─▶ GEMM2 ─▶ + shared
    side stream:                 └─▶ shared expert (cuBLAS, into preallocated buffers) ──────┘

The shared expert needs only the normed hidden states, so it forks right after the norm and
overlaps the routing chain and the routed experts (strategy "stream"); "inline" runs it on the
main stream after the routed experts. Semantics: reference.moe_layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..spec import MoESpec, MoEWeights
from . import experts, preamble, streams
from .expert_configs import ExpertConfig
from .shared_expert import SharedExpertBuffers, shared_expert_into

SHARED_STRATEGIES = ("stream", "inline")


@dataclass
class LoweringOptions:
    """Process-wide choices that do not change what the layer computes.

    deterministic: the expert block's fixed-order reduction instead of fp32 atomics.
    shared_expert: "stream", "inline", or None to let the plan choose.
    """

    deterministic: bool = os.environ.get("MOE_FUSION_DETERMINISTIC", "0") == "1"
    shared_expert: Optional[str] = os.environ.get("MOE_FUSION_SHARED_EXPERT") or None


options = LoweringOptions()


@dataclass(frozen=True)
class LayerPlan:
    expert_config: ExpertConfig
    shared_expert: str  # "stream" | "inline" | "none"
    deterministic: bool


def plan_layer(spec: MoESpec, m: int, device: torch.device) -> LayerPlan:
    shared = "none"
    if spec.has_shared_experts:
        # The side stream needs CUDA; the interpreter (CPU tensors) runs everything in order.
        shared = options.shared_expert or ("stream" if device.type == "cuda" else "inline")
        if shared not in SHARED_STRATEGIES:
            raise ValueError(f"shared_expert strategy {shared!r}; expected one of {SHARED_STRATEGIES}")
    return LayerPlan(experts.expert_config(spec, m, device), shared, options.deterministic)


def moe_layer(spec: MoESpec, x: torch.Tensor, w: MoEWeights, plan: Optional[LayerPlan] = None) -> torch.Tensor:
    """reference.moe_layer on the kernels; raises preamble/experts.Unsupported before any launch
    it cannot make."""
    plan = plan or plan_layer(spec, x.shape[0], x.device)
    if spec.has_shared_experts:  # cuBLAS into preallocated buffers: one dtype throughout
        for name in ("shared_gate", "shared_up", "shared_down") + (("shared_expert_gate",) if spec.shared_gate else ()):
            if getattr(w, name).dtype != x.dtype:
                raise experts.Unsupported(f"shared expert weight {name} is {getattr(w, name).dtype}, "
                                          f"hidden states {x.dtype}")
    shared_buffers = SharedExpertBuffers.allocate(spec, x) if plan.shared_expert != "none" else None

    def fork_shared_expert(normed: torch.Tensor) -> None:
        streams.fork(x.device, lambda: shared_expert_into(spec, normed, w, shared_buffers))

    after_norm = fork_shared_expert if plan.shared_expert == "stream" else None

    pre = preamble.fused_preamble(spec, x, w, block_m=plan.expert_config.block_m, after_norm=after_norm,
                                  deterministic=plan.deterministic)
    quantized = spec.fp8 and pre.x_fp8.numel() > 0
    out = experts.fused_experts(
        spec, pre.normed, pre.topk_ids, pre.topk_weights, w,
        x_fp8=pre.x_fp8 if quantized else None, x_scale=pre.x_scale if quantized else None,
        alignment=(pre.sorted_pair_ids, pre.tile_expert, pre.num_tiles),
        deterministic=plan.deterministic, config=plan.expert_config,
    )
    if plan.shared_expert == "stream":
        streams.join(x.device)
    elif plan.shared_expert == "inline":
        shared_expert_into(spec, pre.normed, w, shared_buffers)
    if shared_buffers is not None:
        out += shared_buffers.out
    return out.to(x.dtype)
