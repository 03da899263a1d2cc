"""The custom ops: eager answers equal the reference, and compiled with fullgraph=True,
dynamic=True they serve M = 1, 7 and 64 from one compiled graph."""
import pytest
import torch

import moe_fusion  # noqa: F401
from moe_fusion.lowering import reference
from moe_fusion.ops import call_moe_layer, call_moe_preamble

from moe_cases import dsv3_like, random_weights

SPECS = {
    "dsv3": dsv3_like(),
    "dsv3_ep_fp8": dsv3_like(hidden_size=128, intermediate_size=128, num_local_experts=4, quant="fp8_block"),
    "softmax_gated_shared": dsv3_like(
        rms_norm=False, router_fp32=False, scoring="softmax", correction_bias=False, n_group=1, topk_group=1,
        renormalize=False, renormalize_eps=0.0, routed_scaling_factor=1.0, shared_gate=True,
    ),
}


@pytest.mark.parametrize("name", SPECS)
def test_eager_ops_equal_reference(name):
    spec = SPECS[name]
    w = random_weights(spec)
    x = torch.randn(7, spec.hidden_size)
    torch.testing.assert_close(call_moe_layer(spec, x, w), reference.moe_layer(spec, x, w))
    normed, x_fp8, x_scale, ids, weights = call_moe_preamble(spec, x, w)
    ref_normed, ref_ids, ref_weights = reference.moe_preamble(spec, x, w)
    torch.testing.assert_close(normed, ref_normed)
    assert ids.dtype == torch.int32 and torch.equal(ids, ref_ids)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, ref_weights)
    if spec.fp8:
        q, s = reference.quantize_fp8_groups(ref_normed)
        assert torch.equal(x_fp8.view(torch.uint8), q.view(torch.uint8)) and torch.equal(x_scale, s)
    else:
        assert x_fp8.numel() == 0 and x_scale.numel() == 0


def test_preamble_output_does_not_alias_input_without_norm():
    spec = SPECS["softmax_gated_shared"]
    w = random_weights(spec)
    x = torch.randn(3, spec.hidden_size)
    normed = call_moe_preamble(spec, x, w)[0]
    assert normed.data_ptr() != x.data_ptr() and torch.equal(normed, x)


def test_bad_hidden_shape_is_a_clear_error():
    spec = SPECS["dsv3"]
    with pytest.raises(ValueError, match=r"expected hidden states \[M, 64\]"):
        call_moe_layer(spec, torch.randn(2, 63), random_weights(spec))


@pytest.mark.parametrize("name", ["dsv3", "dsv3_ep_fp8"])
def test_compiled_dynamic_no_recompile(name):
    spec = SPECS[name]
    w = random_weights(spec)

    def layer(x):
        out = call_moe_layer(spec, x, w)
        normed, _, _, ids, weights = call_moe_preamble(spec, x, w)
        return out, ids, weights

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for M in (1, 7, 64):
        x = torch.randn(M, spec.hidden_size)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        out, ids, weights = compiled(x)
        ref_normed, ref_ids, ref_weights = reference.moe_preamble(spec, x, w)
        torch.testing.assert_close(out, reference.moe_layer(spec, x, w))
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
