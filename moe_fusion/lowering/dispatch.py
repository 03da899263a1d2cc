"""Where an op call goes: the Triton kernels when they take the spec on this device, otherwise
the reference (always correct, sync-free, slower), with the reason recorded.

CPU tensors always take the reference (the kernels are tested on the CPU through the Triton
interpreter, which is far too slow to serve a model).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Tuple

import torch

from ..spec import MoESpec, MoEWeights
from . import reference
from .unsupported import Unsupported

log = logging.getLogger("moe_fusion.lowering")

# (op, spec json) -> why that op runs the reference instead of the kernels.
fallback_reasons: Dict[Tuple[str, str], str] = {}


def _on_kernels(op: str, spec: MoESpec, x: torch.Tensor, kernels: Callable, fallback: Callable):
    if not x.is_cuda:
        return fallback()
    try:
        return kernels()
    except Unsupported as reason:
        key = (op, spec.to_json())
        if key not in fallback_reasons:
            fallback_reasons[key] = str(reason)
            log.warning("moe_fusion: %s runs the reference path: %s", op, reason)
        return fallback()


def moe_layer(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    _check_input(spec, x, w)

    def kernels():
        from . import layer

        return layer.moe_layer(spec, x, w)

    return _on_kernels("moe_layer", spec, x, kernels, lambda: reference.moe_layer(spec, x, w))


def moe_preamble(spec: MoESpec, x: torch.Tensor, w: MoEWeights, as_in_layer: bool = False):
    """(normed, x_fp8, x_scale, topk_ids, topk_weights). as_in_layer: also align the pairs for the
    layer's expert tiles, as moe_layer's preamble does (the work issue 4 times: the bench's preamble
    part); the op, which feeds experts left as the model wrote them, does not."""
    _check_input(spec, x, w)

    def kernels():
        from . import layer, preamble

        block_m = layer.plan_layer(spec, x.shape[0], x.device).expert_config.block_m if as_in_layer else 1
        out = preamble.fused_preamble(spec, x, w, block_m=block_m, with_alignment=as_in_layer,
                                      deterministic=layer.options.deterministic)
        return out.normed, out.x_fp8, out.x_scale, out.topk_ids, out.topk_weights

    return _on_kernels("moe_preamble", spec, x, kernels, lambda: _reference_preamble(spec, x, w))


def _reference_preamble(spec: MoESpec, x: torch.Tensor, w: MoEWeights):
    normed, *rest = reference.preamble_outputs(spec, x, w)
    # The op's outputs may not alias its inputs: without a norm, "normed" is x itself.
    return (normed.clone() if normed is x else normed, *rest)


def routed_experts(spec: MoESpec, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   w: MoEWeights) -> torch.Tensor:
    """The routed-expert block alone on normed x [M, H]: sum_k weight * expert(x); fp32 [M, H]."""
    _check_input(spec, x, w)

    def kernels():
        from . import experts

        return experts.fused_experts(spec, x, topk_ids, topk_weights, w)

    return _on_kernels("routed_experts", spec, x, kernels,
                       lambda: reference.routed_experts(spec, x, topk_ids, topk_weights, w))


def _check_input(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> None:
    if x.dim() != 2 or x.shape[1] != spec.hidden_size:
        raise ValueError(f"moe_fusion: expected hidden states [M, {spec.hidden_size}], got {tuple(x.shape)}")
    # A tensor on another device would reach a kernel as a bad pointer, and the reference mixes
    # meta and CPU tensors without complaint into an uninitialised result.
    for name, t in vars(w).items():
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"moe_fusion: {name} is on {t.device}, the hidden states on {x.device}")
