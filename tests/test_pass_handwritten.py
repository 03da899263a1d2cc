"""The pass on MoE code written by hand (moe_fusion/tools/example_models.py): gpt-fast style
einsum experts, a DeepSeek-style layer with nn.RMSNorm and torch._grouped_mm, and one model
with two kinds of MoE layer; and a grouped-GEMM expert block with transformers 5.17's sentinel-id masks."""
import pytest
import torch
import torch.nn.functional as F

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


class SentinelMaskedMoE(torch.nn.Module):
    """Softmax top-k routing and fused gate_up experts on torch._grouped_mm that, like transformers
    5.17's grouped-GEMM experts, clamp the sorted expert ids to [0, clamp_max] and zero the rows of
    "sentinel" ids (>= mask_from) in the GEMM input and both GEMM outputs. With clamp_max = E - 1
    and mask_from = E neither ever changes a value; below that they change what the layer computes."""

    def __init__(self, mask_from: int, clamp_max: int, hidden=64, experts=8, intermediate=32, top_k=2):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.top_k, self.experts, self.mask_from, self.clamp_max = top_k, experts, mask_from, clamp_max
        self.router = torch.nn.Parameter(torch.randn(experts, hidden, generator=gen) / hidden ** 0.5)
        self.gate_up = torch.nn.Parameter(torch.randn(experts, 2 * intermediate, hidden, generator=gen) / hidden ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(experts, hidden, intermediate, generator=gen) / intermediate ** 0.5)

    def forward(self, x):
        probs = torch.softmax(x @ self.router.t(), dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        order = ids.reshape(-1).argsort()
        sorted_ids = ids.reshape(-1)[order].clamp(0, self.clamp_max)
        sentinel = (sorted_ids >= self.mask_from).unsqueeze(-1)
        offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=self.experts, min=0, max=self.experts - 1),
                               0, dtype=torch.int32)
        rows = x[order // self.top_k].masked_fill(sentinel, 0.0)
        gate_up = torch._grouped_mm(rows, self.gate_up.transpose(1, 2), offs=offsets).masked_fill(sentinel, 0.0)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offsets).masked_fill(sentinel, 0.0)
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(y)
        out[order] = y
        return out.view(x.shape[0], self.top_k, -1).sum(dim=1)


# (mask_from, clamp_max) for 8 experts: masks and clamp idle; a mask that drops expert 7; a clamp
# that sends expert 7's tokens to expert 6.
SENTINEL_CASES = {"idle": (8, 7), "mask_applies": (7, 7), "clamp_applies": (8, 6)}


@pytest.mark.parametrize("case", list(SENTINEL_CASES))
def test_sentinel_masks_and_clamps_that_never_apply_are_seen_through(case):
    """Masks of ids >= num_experts after a top-k over num_experts, and a clamp to [0, E - 1], are
    no-ops: the layer matches as if they were not there. A mask or clamp that can apply is part of
    what the layer computes: the experts are left as written (routing fused only)."""
    dtype = torch.bfloat16  # torch._grouped_mm takes bf16 only
    model = SentinelMaskedMoE(*SENTINEL_CASES[case]).to(dtype).eval()
    backend = compile_and_compare(model, hidden_states(64, dtype), dtype)
    (layer,) = backend.report.layers
    gm = backend.graph_modules[-1]
    if case == "idle":
        assert layer.status == "matched", backend.report.format_text()
        assert (layer.spec["top_k"], layer.spec["num_experts"], layer.spec["intermediate_size"]) == (2, 8, 32)
        assert count_ops(gm, "moe_fusion.moe_layer") == 1 and count_ops(gm, "_grouped_mm", "aten.where", "clamp") == 0
    else:
        assert layer.status == "partial", backend.report.format_text()
        assert count_ops(gm, "_grouped_mm") == 2


class OnlineSoftmaxRouterMoE(example_models.GptFastMoE):
    """The gpt-fast layer with its router softmax written as Inductor's CUDA post-grad pass leaves
    it: prepare_softmax_online(x) gives the row max and the sum of exp(x - max), then
    exp(x - max) / sum (on the CPU Inductor keeps the decomposed softmax, so the form is written here).
    softmax_dim 0 normalises over the tokens instead: not a router softmax."""

    def __init__(self, softmax_dim: int):
        super().__init__()
        self.softmax_dim = softmax_dim

    def scores(self, logits):
        row_max, row_sum = torch.ops.prims.prepare_softmax_online(logits, self.softmax_dim)
        return torch.exp(logits - row_max) / row_sum


@pytest.mark.parametrize("softmax_dim", [-1, 0])
def test_softmax_router_in_inductors_online_form_on_cuda(softmax_dim):
    """Qwen3 / Mixtral / Qwen2 routers on CUDA reach the pass in this form (over the experts)."""
    model = OnlineSoftmaxRouterMoE(softmax_dim).eval()
    backend = compile_and_compare(model, hidden_states(example_models.HIDDEN, torch.float32), torch.float32)
    (layer,) = backend.report.layers
    if softmax_dim == 0:
        assert layer.status == "not matched", backend.report.format_text()
        return
    assert layer.status == "matched", backend.report.format_text()
    assert (layer.spec["scoring"], layer.spec["top_k"], layer.spec["renormalize"]) == ("softmax", 2, True)
    gm = backend.graph_modules[-1]
    assert count_ops(gm, "moe_fusion.moe_layer") == 1 and count_ops(gm, "prepare_softmax_online", "aten.topk") == 0
