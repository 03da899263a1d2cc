"""What the pass must not touch: GptOss (experts are not gated SiLU), a dense MLP, a top-k that
samples tokens. The graph keeps the same node list and the report says why."""
import torch

from moe_fusion import hf_models
from moe_fusion.tools import example_models
from pass_helpers import TEST_ATTENTION, compile_and_compare, hidden_states, token_ids


def _unchanged(backend):
    assert backend.report.graphs and not any(g.changed for g in backend.report.graphs)
    assert backend.report.matched == 0 and backend.report.count("partial") == 0


def test_gpt_oss_is_not_matched():
    model = hf_models.build_model("gpt_oss", **TEST_ATTENTION)
    backend = compile_and_compare(model, token_ids(model.config.vocab_size), torch.float32)
    _unchanged(backend)
    layers = backend.report.layers
    assert len(layers) == hf_models.count_moe_layers(model)
    for layer in layers:
        assert layer.status == "not matched"
        assert "not a bias-free gated-SiLU expert" in layer.reason
        assert "router GEMM has a bias" in layer.reason


def test_dense_mlp_is_not_matched():
    model = example_models.build("dense_mlp")
    backend = compile_and_compare(model, hidden_states(example_models.HIDDEN, torch.float32), torch.float32)
    _unchanged(backend)
    assert "no top-k" in backend.report.graphs[0].note


def test_sampling_topk_is_not_matched():
    model = example_models.build("topk_sampler")
    backend = compile_and_compare(model, hidden_states(example_models.HIDDEN, torch.float32), torch.float32)
    _unchanged(backend)
    (layer,) = backend.report.layers
    assert layer.status == "not matched" and "not MoE routing" in layer.reason
    assert layer.failures[0]["node"] == "topk"
