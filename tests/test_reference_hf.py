"""The reference semantics equal the HF transformers 5.23 MoE blocks (fp32, random weights,
non-zero correction bias): same top-k ids, same outputs within fp32 tolerance."""
import pytest
import torch

import hf_blocks
from moe_fusion import hf_models
from moe_fusion.lowering import reference

pytest.importorskip("transformers")

M = 13  # not a multiple of any block size


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _first_moe_block(model):
    return next(m for m in model.modules() if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router")))


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_deepseek_v3(implementation):
    model = hf_models.build_model("deepseek_v3", experts_implementation=implementation, seed=1)
    block = _first_moe_block(model)
    assert block.gate.e_score_correction_bias.abs().min() > 0
    spec, w = hf_blocks.deepseek_v3(block)
    x = torch.randn(M, spec.hidden_size)
    with torch.no_grad():
        _, hf_weights, hf_ids = block.gate(x)
        ids, weights = reference.select_experts(spec, reference.router_logits(spec, x, w.router_weight), w.correction_bias)
        order_hf, order_ref = hf_ids.sort(-1), ids.long().sort(-1)
        assert torch.equal(order_hf.values, order_ref.values)
        torch.testing.assert_close(hf_weights.gather(1, order_hf.indices), weights.gather(1, order_ref.indices))
        expected = block(x.view(1, M, -1)).view(M, -1)
        got = reference.moe_layer(spec, x, w)
    assert _rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("model_type,norm_topk_prob", [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)])
def test_softmax_topk_blocks(model_type, norm_topk_prob):
    overrides = {"norm_topk_prob": norm_topk_prob} if model_type == "qwen3_moe" else {}
    model = hf_models.build_model(model_type, seed=2, **overrides)
    block = _first_moe_block(model)
    num_experts = block.gate.num_experts
    spec, w = hf_blocks.softmax_topk(block, num_experts, renormalize=norm_topk_prob)
    x = torch.randn(M, spec.hidden_size)
    with torch.no_grad():
        _, hf_weights, hf_ids = block.gate(x)
        ids, weights = reference.select_experts(spec, reference.router_logits(spec, x, w.router_weight))
        assert torch.equal(hf_ids, ids.long())
        torch.testing.assert_close(hf_weights, weights)
        expected = block(x.view(1, M, -1)).view(M, -1)
        got = reference.moe_layer(spec, x, w)
    assert _rel_err(got, expected) < 1e-5


def test_qwen2_moe_gated_shared_expert():
    model = hf_models.build_model("qwen2_moe", seed=3)
    block = _first_moe_block(model)
    spec, w = hf_blocks.softmax_topk(
        block, block.gate.num_experts, renormalize=False, shared=block.shared_expert, shared_gate=block.shared_expert_gate
    )
    assert spec.shared_gate
    x = torch.randn(M, spec.hidden_size)
    with torch.no_grad():
        expected = block(x.view(1, M, -1)).view(M, -1)
        got = reference.moe_layer(spec, x, w)
    assert _rel_err(got, expected) < 1e-5


def test_llama4_weight_on_input():
    model = hf_models.build_model("llama4_text", seed=4)
    block = _first_moe_block(model)
    spec, w = hf_blocks.llama4(block)
    x = torch.randn(M, spec.hidden_size)
    with torch.no_grad():
        expected, _ = block(x)
        got = reference.moe_layer(spec, x, w)
    assert _rel_err(got, expected) < 1e-5
