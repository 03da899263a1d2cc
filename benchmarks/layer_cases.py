"""Shared pieces of the GPU reliability and overlap scripts (gpu_reliability.py, gpu_overlap.py,
kernel_driver.py): random layer weights made on the device, the float64 expected output of a
whole layer for the routing the kernels chose, and a recorder of the layer's parts.

Weights are drawn on the device itself: the real dsv3 experts are 22.5 GB of bf16, which a CPU
generator (tests/moe_cases.random_weights) would take minutes to make and copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, Optional

import torch

from moe_fusion.lowering import experts, layer, preamble, reference
from moe_fusion.spec import MoESpec, MoEWeights


def layer_weights(spec: MoESpec, device, seed: int = 0) -> MoEWeights:
    """Random weights (never zeros) in canonical form, as tests/moe_cases.random_weights lays them
    out (rank 0 owns every (E / L)-th expert under expert parallelism); fp8 specs get their experts
    block-quantised by experts.quantize_fp8_blocks (the project's kernel where kernels run)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    dt = spec.torch_dtype
    E, H, I, Is = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.shared_intermediate_size

    def mat(*shape):  # drawn in the model dtype: no fp32 copy of the experts is ever made
        return _random_matrix(shape, g, device, dt)

    w = MoEWeights(router_weight=mat(spec.num_experts, H), w_gate=mat(E, I, H), w_up=mat(E, I, H),
                   w_down=mat(E, H, I))
    w.norm_weight, w.correction_bias = _norm_and_bias(spec, g, device)
    if spec.fp8:
        for name in ("w_gate", "w_up", "w_down"):
            q, scale = experts.quantize_fp8_blocks(getattr(w, name))
            setattr(w, name, q)
            setattr(w, name + "_scale", scale)
    if spec.has_shared_experts:
        w.shared_gate, w.shared_up, w.shared_down = mat(Is, H), mat(Is, H), mat(H, Is)
    if spec.shared_gate:
        w.shared_expert_gate = mat(1, H)
    if spec.expert_parallel:
        stride = spec.num_experts // spec.num_local_experts
        expert_map = torch.full((spec.num_experts,), -1, dtype=torch.int32)
        expert_map[torch.arange(spec.num_local_experts) * stride] = torch.arange(spec.num_local_experts,
                                                                                 dtype=torch.int32)
        w.expert_map = expert_map.to(device)
    return w


def _random_matrix(shape, g: torch.Generator, device, dtype) -> torch.Tensor:
    """N(0, 1 / fan_in), fan_in the last dimension."""
    return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(shape[-1] ** -0.5)


def _norm_and_bias(spec: MoESpec, g: torch.Generator, device) -> tuple:
    """(norm weight 1 + N(0, 0.1^2) or None, correction bias N(0, 0.1^2) or None)."""
    norm = bias = None
    if spec.rms_norm:
        norm = (1 + 0.1 * torch.randn(spec.hidden_size, generator=g, device=device)).to(spec.torch_dtype)
    if spec.correction_bias:
        bias = 0.1 * torch.randn(spec.num_experts, generator=g, device=device)
    return norm, bias


def with_new_router(spec: MoESpec, w: MoEWeights, seed: int) -> MoEWeights:
    """w with its router weight, norm weight and correction bias drawn anew from ``seed`` as layer_weights
    draws them, every expert tensor shared: under expert parallelism the router sets how many local
    experts a routing hits, which the layer's time follows (benchmarks/routing_seeds.py)."""
    device = w.router_weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    router = _random_matrix((spec.num_experts, spec.hidden_size), g, device, w.router_weight.dtype)
    norm, bias = _norm_and_bias(spec, g, device)
    return dataclasses.replace(w, router_weight=router, norm_weight=norm, correction_bias=bias)


def with_own_tensors(w: MoEWeights, names) -> MoEWeights:
    """w with clones of the tensors ``names`` (those it has), sharing every other tensor: a copy a
    timed call reads from HBM where w's would still be in L2."""
    return dataclasses.replace(w, **{name: getattr(w, name).clone() for name in names
                                     if getattr(w, name) is not None})


def _expert_fp64(spec: MoESpec, w: MoEWeights, e: int, x: torch.Tensor) -> torch.Tensor:
    """Local expert e on rows x (model dtype), float64 arithmetic; fp8 experts through the
    reference's emulation (x and the SiLU*up product quantised per 1x128 group, as the kernels do)."""
    if spec.fp8:
        wg, wu, wd = (reference.dequantize_fp8_blocks(q[e], s[e]).double() for q, s in
                      ((w.w_gate, w.w_gate_scale), (w.w_up, w.w_up_scale), (w.w_down, w.w_down_scale)))
        return reference._fp8_gated_mlp(x, wg, wu, wd).double()
    return reference.gated_mlp(x.double(), w.w_gate[e].double(), w.w_up[e].double(), w.w_down[e].double())


def expected_output(spec: MoESpec, w: MoEWeights, normed: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, shared_fp8: bool = False) -> torch.Tensor:
    """float64 routed + shared output for the routing the kernels chose (so a near-tie that flips
    an expert is not mistaken for a wrong kernel), computed over the local experts it hits only:
    the full float64 reference of the real layer would need 90 GB. shared_fp8: the shared expert
    as the "fused" strategy computes it next to fp8 experts (block-quantised)."""
    local = reference.local_expert_ids(spec, topk_ids, w.expert_map)
    out = torch.zeros(normed.shape, dtype=torch.float64, device=normed.device)
    for e in local[local >= 0].unique().tolist():
        rows, slots = (local == e).nonzero(as_tuple=True)
        y = _expert_fp64(spec, w, e, normed[rows])
        out.index_add_(0, rows, y * topk_weights[rows, slots, None].double())
    if spec.has_shared_experts:
        shared = reference.shared_experts_fp8 if shared_fp8 else reference.shared_experts
        out += shared(spec, normed.double(), w)
    return out


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error; inf when an element is not finite (never written, or NaN)."""
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - expected).norm() / expected.norm())


@contextlib.contextmanager
def recorded_parts() -> Iterator[Dict[str, object]]:
    """While active, layer.moe_layer's parts are kept: "preamble" (its PreambleOut), "routed" (a
    copy of the expert block's fp32 output) and "shared" (the separately computed shared expert's
    output buffer). The layer is observed through the functions and classes it calls, so what is
    checked is the very call the layer makes; the copy is one extra kernel on the main stream."""
    parts: Dict[str, object] = {}
    real_preamble, real_experts = preamble.fused_preamble, experts.fused_experts
    real_shared = (layer.CublasSharedExpert, layer.SharedExpertOnExpertKernels)

    def fused_preamble(*args, **kwargs):
        parts["preamble"] = real_preamble(*args, **kwargs)
        return parts["preamble"]

    def fused_experts(*args, **kwargs):
        out = real_experts(*args, **kwargs)
        parts["routed"] = out.clone()
        return out

    def recording(shared_expert_class):
        class Recorded(shared_expert_class):
            def run(self):
                super().run()
                parts["shared"] = self.out
        return Recorded

    preamble.fused_preamble, experts.fused_experts = fused_preamble, fused_experts
    layer.CublasSharedExpert, layer.SharedExpertOnExpertKernels = (recording(c) for c in real_shared)
    try:
        yield parts
    finally:
        preamble.fused_preamble, experts.fused_experts = real_preamble, real_experts
        layer.CublasSharedExpert, layer.SharedExpertOnExpertKernels = real_shared


@contextlib.contextmanager
def layer_options(deterministic: bool, shared_expert: Optional[str], shared_fp8: bool = False) -> Iterator[None]:
    """layer.options set for the duration (process-wide, as MOE_FUSION_* would set them)."""
    o = layer.options
    saved = (o.deterministic, o.shared_expert, o.shared_fp8)
    o.deterministic, o.shared_expert, o.shared_fp8 = deterministic, shared_expert, shared_fp8
    try:
        yield
    finally:
        o.deterministic, o.shared_expert, o.shared_fp8 = saved
