"""Test helpers: read a MoESpec and MoEWeights straight off HF transformers MoE blocks, by
module attributes (independently of the pass, which works on graphs)."""
from __future__ import annotations

import torch

from moe_fusion.spec import MoESpec, MoEWeights


def _split_gate_up(gate_up: torch.Tensor, I: int):
    return gate_up[:, :I], gate_up[:, I:]


def deepseek_v3(block, dtype="float32"):
    cfg = block.config
    I = cfg.moe_intermediate_size
    spec = MoESpec(
        hidden_size=cfg.hidden_size, num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
        intermediate_size=I, router_fp32=True, scoring="sigmoid", correction_bias=True,
        n_group=cfg.n_group, topk_group=cfg.topk_group, group_score="top2_sum",
        renormalize=cfg.norm_topk_prob, renormalize_eps=1e-20, routed_scaling_factor=cfg.routed_scaling_factor,
        shared_intermediate_size=I * cfg.n_shared_experts, dtype=dtype,
    )
    w_gate, w_up = _split_gate_up(block.experts.gate_up_proj, I)
    se = block.shared_experts
    weights = MoEWeights(
        router_weight=block.gate.weight, correction_bias=block.gate.e_score_correction_bias,
        w_gate=w_gate, w_up=w_up, w_down=block.experts.down_proj,
        shared_gate=se.gate_proj.weight, shared_up=se.up_proj.weight, shared_down=se.down_proj.weight,
    )
    return spec, weights


def softmax_topk(block, num_experts, renormalize, dtype="float32", shared=None, shared_gate=None):
    """Qwen3-MoE, Mixtral and Qwen2-MoE blocks: softmax over logits in the model dtype, top-k."""
    experts = block.experts
    I = experts.intermediate_dim
    w_gate, w_up = _split_gate_up(experts.gate_up_proj, I)
    spec = MoESpec(
        hidden_size=experts.hidden_dim, num_experts=num_experts, top_k=block.gate.top_k, intermediate_size=I,
        scoring="softmax", renormalize=renormalize, dtype=dtype,
        shared_intermediate_size=0 if shared is None else shared.gate_proj.weight.shape[0],
        shared_gate=shared_gate is not None,
    )
    weights = MoEWeights(router_weight=block.gate.weight, w_gate=w_gate, w_up=w_up, w_down=experts.down_proj)
    if shared is not None:
        weights.shared_gate, weights.shared_up, weights.shared_down = (
            shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
    if shared_gate is not None:
        weights.shared_expert_gate = shared_gate.weight
    return spec, weights


def llama4(block, dtype="float32"):
    """Llama4: top-k on logits, sigmoid of the chosen logits scales the expert *input*;
    experts stored transposed ([E, H, 2I] and [E, I, H])."""
    experts = block.experts
    I = experts.expert_dim
    gate_up = experts.gate_up_proj.transpose(1, 2)  # [E, 2I, H]
    spec = MoESpec(
        hidden_size=block.hidden_dim, num_experts=block.num_experts, top_k=block.top_k, intermediate_size=I,
        scoring="sigmoid", score_before_topk=False, weight_on="input",
        shared_intermediate_size=block.shared_expert.gate_proj.weight.shape[0], dtype=dtype,
    )
    se = block.shared_expert
    weights = MoEWeights(
        router_weight=block.router.weight, w_gate=gate_up[:, :I], w_up=gate_up[:, I:],
        w_down=experts.down_proj.transpose(1, 2),
        shared_gate=se.gate_proj.weight, shared_up=se.up_proj.weight, shared_down=se.down_proj.weight,
    )
    return spec, weights
