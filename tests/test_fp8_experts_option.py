"""fp8 experts on a bf16/fp16/fp32 model: MoESpec quant "fp8_block_quantize" (the weights come in the
model dtype and run as fp8_block from their block quantisation, made once and cached), asked for
with MoEFusionBackend(fp8_experts=True) or options={"moe_fusion.fp8_experts": True}."""
import torch

from moe_fusion.backend import FP8_EXPERTS_OPTION, MoEFusionBackend
from moe_fusion.lowering import dispatch, experts, reference
from moe_fusion.spec import FP8_DTYPE
from moe_fusion.tools import example_models

from moe_cases import dsv3_like, random_weights


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_the_reference_defines_it_as_fp8_block_on_the_quantised_weights():
    spec = dsv3_like(hidden_size=200, intermediate_size=136, quant="fp8_block_quantize", dtype="float32")
    w = random_weights(spec)
    spec8, w8 = reference.with_fp8_experts(spec, w)
    assert spec8 == spec.replace(quant="fp8_block") and w8.w_gate.dtype == FP8_DTYPE
    q, s = reference.quantize_fp8_blocks(w.w_down)
    assert torch.equal(w8.w_down.view(torch.uint8), q.view(torch.uint8)) and torch.equal(w8.w_down_scale, s)
    assert w8.router_weight is w.router_weight and w.w_gate.dtype == torch.float32  # the caller's weights untouched
    x = torch.randn(5, spec.hidden_size)
    torch.testing.assert_close(reference.moe_layer(spec, x, w), reference.moe_layer(spec8, x, w8), rtol=0, atol=0)


def test_the_op_quantises_once_per_set_of_weights():
    spec = dsv3_like(hidden_size=256, intermediate_size=128, quant="fp8_block_quantize", dtype="float32")
    w = random_weights(spec, seed=1)
    x = torch.randn(3, spec.hidden_size)
    spec8, w8 = reference.with_fp8_experts(spec, w)
    expected = reference.moe_layer(spec8, x, w8)
    got = dispatch.moe_layer(spec, x, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    first = experts.with_fp8_experts(spec, w)[1].w_up
    assert experts.with_fp8_experts(spec, w)[1].w_up is first  # cached
    with torch.no_grad():
        w.w_up.mul_(2.0)  # an in-place update (load_state_dict) makes new copies
    again = experts.with_fp8_experts(spec, w)[1]
    assert again.w_up is not first
    torch.testing.assert_close(again.w_up_scale, reference.quantize_fp8_blocks(w.w_up)[1], rtol=0, atol=0)


def _compile(model, x, backend, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=True, **kwargs)(x)


def test_the_backend_option_runs_the_matched_experts_in_fp8(monkeypatch):
    """The compiled model's output is the fp8 reference on the model's own weights, quantised by
    reference.quantize_fp8_blocks (recomputed here from the op's recorded inputs)."""
    model = example_models.build("gpt_fast")
    x = torch.randn(6, example_models.HIDDEN)
    with torch.no_grad():
        eager = model(x)
    plain = MoEFusionBackend(codegen=False)
    assert _rel(_compile(model, x, plain), eager) < 1e-5
    assert plain.report.specs()[0]["quant"] == "none"
    calls = []
    real = dispatch.moe_layer
    monkeypatch.setattr(dispatch, "moe_layer", lambda spec, xs, w: calls.append((spec, xs, w)) or real(spec, xs, w))
    for backend, kwargs in ((MoEFusionBackend(codegen=False, fp8_experts=True), {}),
                            (MoEFusionBackend(codegen=False), {"options": {FP8_EXPERTS_OPTION: True}})):
        calls.clear()
        out = _compile(model, x, backend, **kwargs)
        assert backend.report.specs()[0]["quant"] == "fp8_block_quantize"
        (spec, xs, w), = calls
        assert spec.quantizes_experts and w.w_gate.dtype == torch.float32
        spec8 = spec.replace(quant="fp8_block")
        (qg, sg), (qu, su), (qd, sd) = (reference.quantize_fp8_blocks(t) for t in (w.w_gate, w.w_up, w.w_down))
        w8 = type(w)(**{**vars(w), "w_gate": qg, "w_up": qu, "w_down": qd, "w_gate_scale": sg, "w_up_scale": su,
                        "w_down_scale": sd})
        expected = reference.moe_layer(spec8, xs, w8)
        torch.testing.assert_close(out.reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)
        assert 1e-4 < _rel(out, eager)  # fp8 rounding did happen
        # The option of one compile does not stay on the backend.
        assert backend.fusion_pass.fp8_experts is (not kwargs)
