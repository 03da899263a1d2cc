"""The moe_fusion custom ops (namespace ``moe_fusion``), what the pass rewrites MoE layers into.

Each op takes the spec as a JSON string (so graphs, caches and logs carry it as a plain
constant) and the layer's tensors in the canonical form of ``MoEWeights``. The fake
implementations give Inductor, dynamic shapes and CUDA graphs an opaque, well-behaved call;
the real implementations hand over to ``lowering``, which picks kernels or the reference.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .lowering import dispatch
from .spec import FP8_BLOCK, FP8_DTYPE, MoESpec, MoEWeights


def _weights(
    router_weight, w_gate, w_up, w_down, norm_weight=None, correction_bias=None,
    w_gate_scale=None, w_up_scale=None, w_down_scale=None, shared_gate=None, shared_up=None,
    shared_down=None, shared_expert_gate=None, expert_map=None,
) -> MoEWeights:
    return MoEWeights(
        router_weight=router_weight, w_gate=w_gate, w_up=w_up, w_down=w_down, norm_weight=norm_weight,
        correction_bias=correction_bias, w_gate_scale=w_gate_scale, w_up_scale=w_up_scale,
        w_down_scale=w_down_scale, shared_gate=shared_gate, shared_up=shared_up, shared_down=shared_down,
        shared_expert_gate=shared_expert_gate, expert_map=expert_map,
    )


@functools.lru_cache(maxsize=256)
def _spec_with(spec_json: str, scalar_fields: str, values: Tuple[float, ...]) -> MoESpec:
    fields = scalar_fields.split(",") if scalar_fields else []
    if len(fields) != len(values):
        raise ValueError(f"scalar_fields {scalar_fields!r} do not match {len(values)} scalar inputs")
    spec = MoESpec.from_json(spec_json)
    return spec.replace(**dict(zip(fields, values))) if fields else spec


def _call_spec(spec_json: str, scalar_fields: str, scalar_inputs: Sequence[Tensor]) -> MoESpec:
    """The spec with the float fields that arrive as graph inputs (Dynamo does not specialize
    floats) set to this call's values. Dynamo makes them 0-d CPU tensors, so reading them does
    not synchronize the GPU."""
    return _spec_with(spec_json, scalar_fields, tuple(float(t) for t in scalar_inputs))


@torch.library.custom_op("moe_fusion::moe_layer", mutates_args=())
def moe_layer(
    x: Tensor,
    spec: str,
    scalar_inputs: List[Tensor],
    scalar_fields: str,
    router_weight: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    norm_weight: Optional[Tensor] = None,
    correction_bias: Optional[Tensor] = None,
    w_gate_scale: Optional[Tensor] = None,
    w_up_scale: Optional[Tensor] = None,
    w_down_scale: Optional[Tensor] = None,
    shared_gate: Optional[Tensor] = None,
    shared_up: Optional[Tensor] = None,
    shared_down: Optional[Tensor] = None,
    shared_expert_gate: Optional[Tensor] = None,
    expert_map: Optional[Tensor] = None,
) -> Tensor:
    """A whole MoE layer on x [M, H] (pre-norm when the spec fuses the norm); returns [M, H].

    scalar_inputs: 0-d tensors whose values replace the spec fields named (comma-separated) in
    scalar_fields for this call."""
    weights = _weights(
        router_weight, w_gate, w_up, w_down, norm_weight, correction_bias, w_gate_scale, w_up_scale,
        w_down_scale, shared_gate, shared_up, shared_down, shared_expert_gate, expert_map,
    )
    return dispatch.moe_layer(_call_spec(spec, scalar_fields, scalar_inputs), x, weights)


@moe_layer.register_fake
def _moe_layer_fake(x, spec, scalar_inputs, scalar_fields, *tensors, **optional_tensors):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("moe_fusion::moe_preamble", mutates_args=())
def moe_preamble(
    x: Tensor,
    spec: str,
    scalar_inputs: List[Tensor],
    scalar_fields: str,
    router_weight: Tensor,
    norm_weight: Optional[Tensor] = None,
    correction_bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RMSNorm + router + scoring + top-k (+ fp8 activation quantisation) on x [M, H].

    Returns (normed [M, H], x_fp8 [M, H] e4m3, x_scale [M, H/128] fp32, topk_ids [M, k] int32,
    topk_weights [M, k] fp32). x_fp8 and x_scale are empty unless the spec's experts are fp8.
    scalar_inputs / scalar_fields: as for moe_layer.
    """
    weights = MoEWeights(router_weight=router_weight, w_gate=None, w_up=None, w_down=None,
                         norm_weight=norm_weight, correction_bias=correction_bias)
    return dispatch.moe_preamble(_call_spec(spec, scalar_fields, scalar_inputs), x, weights)


@moe_preamble.register_fake
def _moe_preamble_fake(x, spec, scalar_inputs, scalar_fields, router_weight, norm_weight=None, correction_bias=None):
    s = MoESpec.from_json(spec)
    M, H = x.shape
    normed = x.new_empty((M, H))
    if s.fp8:
        x_fp8 = x.new_empty((M, H), dtype=FP8_DTYPE)
        x_scale = x.new_empty((M, -(-H // FP8_BLOCK)), dtype=torch.float32)
    else:
        x_fp8 = x.new_empty((0,), dtype=FP8_DTYPE)
        x_scale = x.new_empty((0,), dtype=torch.float32)
    ids = x.new_empty((M, s.top_k), dtype=torch.int32)
    weights = x.new_empty((M, s.top_k), dtype=torch.float32)
    return normed, x_fp8, x_scale, ids, weights


def call_moe_layer(spec: MoESpec, x: Tensor, w: MoEWeights) -> Tensor:
    """Python-side convenience: the whole-layer op with a spec object and a MoEWeights."""
    return torch.ops.moe_fusion.moe_layer(
        x, spec.to_json(), [], "", w.router_weight, w.w_gate, w.w_up, w.w_down, w.norm_weight, w.correction_bias,
        w.w_gate_scale, w.w_up_scale, w.w_down_scale, w.shared_gate, w.shared_up, w.shared_down,
        w.shared_expert_gate, w.expert_map,
    )


def call_moe_preamble(spec: MoESpec, x: Tensor, w: MoEWeights):
    return torch.ops.moe_fusion.moe_preamble(x, spec.to_json(), [], "", w.router_weight, w.norm_weight, w.correction_bias)
