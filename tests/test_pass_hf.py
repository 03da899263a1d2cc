"""The pass on HF transformers MoE models: every MoE layer matched, the spec read off the graph
equals the spec read off the modules, the covered nodes replaced, logits equal to eager."""
import dataclasses

import pytest
import torch

import hf_blocks
from moe_fusion import hf_models
from moe_fusion.spec import MoESpec
from moe_cases import relative_error
from pass_helpers import SDPA_TAKES_UNBACKED_BATCH, TEST_ATTENTION, compile_and_compare, count_ops, token_ids

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def expected_spec(model_type, block, dtype) -> MoESpec:
    name = DTYPE_NAMES[dtype]
    if model_type == "deepseek_v3":
        return hf_blocks.deepseek_v3(block, name)[0]
    if model_type == "qwen3_moe":
        return hf_blocks.softmax_topk(block, block.gate.num_experts, block.gate.norm_topk_prob, name)[0]
    if model_type == "mixtral":
        return hf_blocks.softmax_topk(block, block.gate.num_experts, True, name)[0]
    if model_type == "qwen2_moe":
        return hf_blocks.softmax_topk(block, block.gate.num_experts, block.gate.norm_topk_prob, name,
                                      shared=block.shared_expert, shared_gate=block.shared_expert_gate)[0]
    if model_type == "llama4_text":
        return hf_blocks.llama4(block, name)[0]
    raise ValueError(model_type)


def moe_blocks(model):
    return [m for m in model.modules() if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))]


def check_specs(report, model, model_type, dtype):
    blocks = moe_blocks(model)
    layers = report.layers
    assert [layer.status for layer in layers] == ["matched"] * len(blocks), report.format_text()
    for layer, block in zip(layers, blocks):
        expected = dataclasses.asdict(expected_spec(model_type, block, dtype))
        got = dict(layer.spec)
        # The norm in front is folded into the op; HF blocks do not own it.
        assert got.pop("rms_norm") is True and got.pop("rms_norm_eps") == pytest.approx(model.config.rms_norm_eps)
        expected.pop("rms_norm"), expected.pop("rms_norm_eps")
        if dtype == torch.float32:  # an fp32 upcast of fp32 values leaves no trace in the graph
            got.pop("router_fp32"), expected.pop("router_fp32")
        assert got == expected


def check_rewritten(backend, layers):
    gm = backend.graph_modules[-1]
    assert count_ops(gm, "moe_fusion.moe_layer") == layers
    expert_ops = ["aten.topk", "_grouped_mm", "grouped_mm_fallback", "aten.sort"]
    if SDPA_TAKES_UNBACKED_BATCH:  # otherwise eager attention's matmuls are bmm (see pass_helpers)
        expert_ops.append("aten.bmm")
    assert count_ops(gm, *expert_ops) == 0
    for layer in backend.report.layers:
        removed_ops = {entry.split(": ")[1] for entry in layer.removed}
        assert "aten.topk" in removed_ops
        assert {"aten._grouped_mm", "transformers.grouped_mm_fallback", "aten.bmm"} & removed_ops


CASES = [
    ("deepseek_v3", "grouped_mm", torch.float32, {}),
    ("deepseek_v3", "batched_mm", torch.float32, {}),
    ("deepseek_v3", "grouped_mm", torch.bfloat16, {}),
    ("deepseek_v3", "batched_mm", torch.float16, {}),
    ("qwen3_moe", "grouped_mm", torch.float32, {"norm_topk_prob": True}),
    ("qwen3_moe", "batched_mm", torch.float32, {"norm_topk_prob": False}),
    ("qwen3_moe", "grouped_mm", torch.bfloat16, {"norm_topk_prob": False}),
    ("mixtral", "grouped_mm", torch.float16, {}),
    ("mixtral", "batched_mm", torch.float32, {}),
    ("qwen2_moe", "grouped_mm", torch.float32, {}),
    ("llama4_text", "grouped_mm", torch.float32, {}),
    ("llama4_text", "grouped_mm", torch.bfloat16, {}),  # the router's sigmoid on an fp32 upcast
]


@pytest.mark.parametrize("model_type,impl,dtype,overrides", CASES,
                         ids=[f"{m}-{i}-{str(d)[6:]}-{o}" for m, i, d, o in CASES])
def test_hf_model_layers_matched_and_rewritten(model_type, impl, dtype, overrides):
    model = hf_models.build_model(model_type, dtype=dtype, experts_implementation=impl, **TEST_ATTENTION, **overrides)
    backend = compile_and_compare(model, token_ids(model.config.vocab_size), dtype)
    n_layers = hf_models.count_moe_layers(model)
    assert backend.report.matched == n_layers == 2
    check_specs(backend.report, model, model_type, dtype)
    check_rewritten(backend, n_layers)
    # The op reads the model's own parameters: weights are graph inputs or views of them.
    layer = backend.report.layers[0]
    assert layer.weights["router_weight"].startswith("arg")


# On CUDA Inductor rewrites graphs where it does not on the CPU (its post-grad pass turns a softmax
# into prepare_softmax_online), and the GPU image's transformers (5.17) writes its experts
# differently (sentinel-id masks): on CUDA every family must match too.
CUDA_FAMILIES = ("deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe", "llama4_text")


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", CUDA_FAMILIES)
def test_hf_model_on_cuda_matched_and_compiled(model_type):
    """bf16 on CUDA through Inductor's code generation: every MoE layer runs on the kernels, the
    logits match eager's at batch 1, 3 and 8, no recompiles."""
    model = hf_models.build_model(model_type, dtype=torch.bfloat16, device="cuda", **TEST_ATTENTION)
    backend = compile_and_compare(model, token_ids(model.config.vocab_size, "cuda"), torch.bfloat16, codegen=True)
    assert backend.report.matched == hf_models.count_moe_layers(model), backend.report.format_text()


FULL_COMPILE = [
    ("deepseek_v3", torch.float32), ("deepseek_v3", torch.bfloat16), ("qwen3_moe", torch.float32),
    ("mixtral", torch.float32), ("llama4_text", torch.float32),
]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,dtype", FULL_COMPILE, ids=[f"{m}-{str(d)[6:]}" for m, d in FULL_COMPILE])
def test_inductor_compiled_logits_match_eager(model_type, dtype):
    """Through Inductor's code generation: the rewritten graph compiles and runs."""
    model = hf_models.build_model(model_type, dtype=dtype, **TEST_ATTENTION)
    backend = compile_and_compare(model, token_ids(model.config.vocab_size), dtype, codegen=True)
    assert backend.report.matched == hf_models.count_moe_layers(model)


def test_float_attributes_changed_after_compile_are_honored():
    """Dynamo passes float attributes as graph inputs (no recompile when they change): the op must
    compute with each call's value, not the one seen at compile time."""
    model = hf_models.build_model("deepseek_v3", dtype=torch.float32, **TEST_ATTENTION)
    backend = compile_and_compare(model, token_ids(model.config.vocab_size), torch.float32)
    assert set(backend.report.layers[0].baked) >= {"routed_scaling_factor", "rms_norm_eps"}
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for layer in model.model.layers:
        layer.mlp.gate.routed_scaling_factor = 0.75
        layer.post_attention_layernorm.variance_epsilon = 0.5
    tokens = token_ids(model.config.vocab_size)(3)
    with torch.no_grad():
        expected, got = model(tokens).logits, compiled(tokens).logits
    assert len(backend.graph_modules) == 1, "expected the compiled graph to be reused"
    assert relative_error(got, expected) < 1e-4
