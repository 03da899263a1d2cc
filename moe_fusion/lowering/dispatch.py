"""Where an op call goes: the planned Triton kernels when they take the spec on this device,
otherwise the reference (always correct, sync-free, slower).

The kernel issues register their implementations here; the decision and its reason are
kept so ``moe-fusion inspect`` can show which path a layer takes.
"""
from __future__ import annotations

import torch

from ..spec import FP8_DTYPE, MoESpec, MoEWeights
from . import reference

# Why the last call of an op left the kernels for the reference (for ``moe-fusion inspect``).
last_fallback_reason = {}


def moe_layer(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    _check_input(spec, x)
    return reference.moe_layer(spec, x, w)


def moe_preamble(spec: MoESpec, x: torch.Tensor, w: MoEWeights):
    _check_input(spec, x)
    if x.is_cuda:
        from .preamble import Unsupported, fused_preamble  # Triton is imported only where it runs

        try:
            out = fused_preamble(spec, x, w, block_m=1, with_alignment=False)
            return out.normed, out.x_fp8, out.x_scale, out.topk_ids, out.topk_weights
        except Unsupported as reason:
            last_fallback_reason["moe_preamble"] = str(reason)
    normed, ids, weights = reference.moe_preamble(spec, x, w)
    if spec.fp8:
        x_fp8, x_scale = reference.quantize_fp8_groups(normed)
    else:
        x_fp8 = x.new_empty((0,), dtype=FP8_DTYPE)
        x_scale = x.new_empty((0,), dtype=torch.float32)
    # The op's outputs may not alias its inputs: without a norm, "normed" is x itself.
    normed = normed.clone() if normed is x else normed
    return normed, x_fp8, x_scale, ids, weights.float()


def routed_experts(spec: MoESpec, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   w: MoEWeights) -> torch.Tensor:
    """The routed-expert block alone on normed x [M, H]: sum_k weight * expert(x); fp32 [M, H]."""
    _check_input(spec, x)
    return reference.routed_experts(spec, x, topk_ids, topk_weights, w)


def _check_input(spec: MoESpec, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != spec.hidden_size:
        raise ValueError(f"moe_fusion: expected hidden states [M, {spec.hidden_size}], got {tuple(x.shape)}")
