"""The pass on MoE code written by hand (moe_fusion/tools/example_models.py): gpt-fast style
einsum experts, a DeepSeek-style layer with nn.RMSNorm and torch._grouped_mm, and one model
with two kinds of MoE layer."""
import pytest
import torch

from moe_fusion.tools import example_models
from pass_helpers import compile_and_compare, count_ops, hidden_states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpt_fast_moe(dtype):
    model = example_models.build("gpt_fast", dtype)
    backend = compile_and_compare(model, hidden_states(example_models.HIDDEN, dtype), dtype)
    (layer,) = backend.report.layers
    assert layer.status == "matched", backend.report.format_text()
    spec = layer.spec
    assert (spec["scoring"], spec["top_k"], spec["num_experts"], spec["intermediate_size"]) == ("softmax", 2, 8, 32)
    assert spec["renormalize"] and not spec["rms_norm"] and spec["shared_intermediate_size"] == 0
    assert layer.weights["w_gate"] != layer.weights["w_up"]
    gm = backend.graph_modules[-1]
    assert count_ops(gm, "moe_fusion.moe_layer") == 1 and count_ops(gm, "aten.bmm", "aten.topk") == 0


def test_deepseek_style_moe_with_nn_rmsnorm_and_grouped_mm():
    dtype = torch.bfloat16  # torch._grouped_mm takes bf16 only
    model = example_models.build("deepseek_style", dtype)
    backend = compile_and_compare(model, hidden_states(example_models.HIDDEN, dtype), dtype)
    (layer,) = backend.report.layers
    assert layer.status == "matched", backend.report.format_text()
    spec = layer.spec
    assert spec["rms_norm"] and spec["rms_norm_eps"] == pytest.approx(1e-6)
    assert (spec["scoring"], spec["n_group"], spec["topk_group"], spec["group_score"]) == ("sigmoid", 4, 2, "max")
    assert spec["correction_bias"] and spec["routed_scaling_factor"] == pytest.approx(1.5)
    assert spec["shared_intermediate_size"] == 32
    assert layer.implementation == "aten._grouped_mm"
    gm = backend.graph_modules[-1]
    assert count_ops(gm, "moe_fusion.moe_layer") == 1
    assert count_ops(gm, "_grouped_mm", "aten.topk", "rsqrt", "aten.mm", "addmm") == 0


def test_two_kinds_of_moe_layer_get_two_specs():
    dtype = torch.float32
    model = example_models.build("two_kinds", dtype)
    backend = compile_and_compare(model, hidden_states(example_models.HIDDEN, dtype), dtype)
    layers = backend.report.layers
    assert [layer.status for layer in layers] == ["matched", "matched"], backend.report.format_text()
    first, second = (layer.spec for layer in layers)
    assert first != second
    assert (first["scoring"], first["n_group"]) == ("sigmoid", 4)
    assert (second["scoring"], second["n_group"]) == ("softmax", 1)
