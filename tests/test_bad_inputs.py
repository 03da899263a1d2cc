"""Bad inputs, each with a defined behaviour (README.md, "## Bad input"): the same result as the
reference, a clean fallback to the reference with the reason in dispatch.fallback_reasons, or a
clear error before any kernel launch. Kernels run under TRITON_INTERPRET=1 on the CPU."""

import torch

import pytest

from moe_fusion.lowering import dispatch, experts, layer, preamble, reference, topk_kernel
from moe_fusion.ops import call_moe_layer, call_moe_preamble
from moe_fusion.spec import MoESpec, MoEWeights
from moe_cases import DEVICE, dsv3_like, needs_kernels, random_weights
from random_specs import check_routing, gemm_error_bound

pytestmark = needs_kernels
SPECS = {
    "dsv3_fp16": dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=24),
    "softmax_no_norm_fp16": MoESpec(hidden_size=40, num_experts=8, top_k=2, intermediate_size=16, scoring="softmax",
                                    renormalize=True, dtype="float16"),
    "dsv3_fp8": dsv3_like(dtype="float16", hidden_size=136, intermediate_size=24, shared_intermediate_size=24,
                          quant="fp8_block"),
}


def _to(w: MoEWeights, device) -> MoEWeights:
    return MoEWeights(**{f: (t.to(device) if isinstance(t, torch.Tensor) else t) for f, t in vars(w).items()})


def _rows_close(got, want, rows, rtol):
    err = (got[rows].double() - want[rows].double()).norm(dim=-1)
    return bool((err <= rtol * want[rows].double().norm(dim=-1) + 1e-3).all())


# --------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("name", list(SPECS))
def test_nan_and_inf_hidden_states_poison_their_rows_only(name):
    """A token with a NaN or an Inf becomes NaN (norm: Inf * 0) or non-finite, exactly where the
    reference's does; the other tokens are unaffected and ids stay in range."""
    spec = SPECS[name]
    w = random_weights(spec)
    x = torch.randn(6, spec.hidden_size).half()
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    got = layer.moe_layer(spec, x.to(DEVICE), _to(w, DEVICE)).cpu()
    want = reference.moe_layer(spec, x, w)
    bad = ~torch.isfinite(want).all(-1)
    assert bad.tolist() == [False, True, False, False, True, False]
    assert torch.equal(~torch.isfinite(got).all(-1), bad)
    assert torch.equal(got.isnan().any(-1), want.isnan().any(-1))
    # The other tokens: exactly what the kernels give them without the bad tokens, and the reference's.
    clean = layer.moe_layer(spec, x[~bad].to(DEVICE), _to(w, DEVICE)).cpu()
    torch.testing.assert_close(got[~bad], clean, rtol=1e-3, atol=1e-3)
    if not spec.fp8:  # fp8 on the interpreter: see test_random_experts._expected_from_kernel_routing
        assert _rows_close(got, want, ~bad, 2e-3)
    pre = preamble.fused_preamble(spec, x.to(DEVICE), _to(w, DEVICE), block_m=16)
    assert ((pre.topk_ids >= 0) & (pre.topk_ids < spec.num_experts)).all()
    assert torch.equal(pre.topk_weights.isnan().any(-1).cpu(), reference.moe_preamble(spec, x, w)[2].isnan().any(-1))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("grouped", [False, True])
def test_nan_and_inf_router_logits(scoring, grouped):
    """Logits with NaN / +Inf / -Inf: weights are NaN on the rows where the reference's are, ids
    are valid experts on every row, and finite rows route as the reference does."""
    spec = MoESpec(hidden_size=8, intermediate_size=8, num_experts=16, top_k=3, scoring=scoring, renormalize=True,
                   n_group=4 if grouped else 1, topk_group=2 if grouped else 1)
    logits = torch.randn(7, 16)
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, 2] = float("-inf")
    logits[4] = float("nan")
    logits[5, :4] = float("inf")
    ids, weights = topk_kernel.select_experts(spec, logits.to(DEVICE), None, torch.float32)
    ids, weights = ids.cpu(), weights.cpu()
    assert ((ids >= 0) & (ids < 16)).all()
    finite = torch.isfinite(logits).all(-1)
    check_routing(spec, logits[finite], None, ids[finite], weights[finite])
    _, ref_weights = reference.select_experts(spec, logits)
    # Which rows are NaN is the reference's; where the reference's weights are finite on a row with
    # an infinite logit, so are the kernel's (the chosen experts may differ only among tied infinities).
    assert torch.equal(weights.isnan().any(-1), ref_weights.isnan().any(-1))


# --------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", list(SPECS))
def test_no_tokens(name):
    spec = SPECS[name]
    w = random_weights(spec)
    x = torch.empty(0, spec.hidden_size, dtype=torch.float16)
    assert layer.moe_layer(spec, x.to(DEVICE), _to(w, DEVICE)).shape == (0, spec.hidden_size)
    ids = torch.empty(0, spec.top_k, dtype=torch.int32)
    out = experts.fused_experts(spec, x.to(DEVICE), ids.to(DEVICE), torch.empty(0, spec.top_k).to(DEVICE), _to(w, DEVICE))
    assert out.shape == (0, spec.hidden_size)
    assert call_moe_layer(spec, x, w).shape == (0, spec.hidden_size)
    assert [t.shape[0] for t in call_moe_preamble(spec, x, w) if t.dim() == 2] == [0] * (5 if spec.fp8 else 3)


def test_m_above_every_tuned_bucket():
    """M = 600 > the largest tuned bucket (512) and > FUSED_MAX_M: the general path with the
    largest bucket's tiles, same result as the reference."""
    spec = MoESpec(hidden_size=32, num_experts=8, top_k=2, intermediate_size=16, scoring="softmax", renormalize=True,
                   dtype="float16")
    w = random_weights(spec)
    x = torch.randn(600, 32).half()
    got = layer.moe_layer(spec, x.to(DEVICE), _to(w, DEVICE)).cpu()
    want = reference.moe_layer(spec, x, w)
    pre = preamble.fused_preamble(spec, x.to(DEVICE), _to(w, DEVICE), block_m=16)
    same = (pre.topk_ids.cpu() == reference.moe_preamble(spec, x, w)[1]).all(-1)
    assert same.float().mean() > 0.95
    assert _rows_close(got, want, same, 1e-2)


# --------------------------------------------------------------------------- layouts
def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with other strides: the last two dims stored transposed."""
    if t is None or t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("name", list(SPECS))
def test_non_contiguous_inputs_give_the_contiguous_answer(name):
    spec = SPECS[name]
    w = random_weights(spec)
    x = torch.randn(5, spec.hidden_size).half()
    x_t = x.t().contiguous().t()  # a transposed view: stride (1, M)
    assert not x_t.is_contiguous()
    w_strided = MoEWeights(**{f: _strided(t) if isinstance(t, torch.Tensor) else t for f, t in vars(w).items()})
    assert not w_strided.w_gate.is_contiguous() and not w_strided.router_weight.is_contiguous()
    want = layer.moe_layer(spec, x.to(DEVICE), _to(w, DEVICE)).cpu()
    got = layer.moe_layer(spec, x_t.to(DEVICE), _to(w_strided, DEVICE)).cpu()
    assert torch.equal(got, want)
    # The ops on the CPU (reference path) take the same views.
    torch.testing.assert_close(call_moe_layer(spec, x_t, w_strided), reference.moe_layer(spec, x, w))


# --------------------------------------------------------------------------- dtypes, devices, specs
class _AsIfCuda:
    """Stands in for CUDA hidden states in dispatch, so its kernel path and fallback run on the CPU."""
    is_cuda = True


def _dispatch_layer(spec, x, w):
    return dispatch._on_kernels("moe_layer", spec, _AsIfCuda(), lambda: layer.moe_layer(spec, x, w),
                                lambda: reference.moe_layer(spec, x, w))


def test_hidden_states_in_another_dtype_fall_back_with_a_reason():
    spec = SPECS["dsv3_fp16"]
    w = random_weights(spec)
    x = torch.randn(3, spec.hidden_size)  # fp32 for an fp16 layer
    dispatch.fallback_reasons.clear()
    got = _dispatch_layer(spec, x, w)
    assert torch.equal(got, reference.moe_layer(spec, x, w)) and got.dtype == torch.float32
    (reason,) = dispatch.fallback_reasons.values()
    assert "float32" in reason


@pytest.mark.parametrize("weight", ["shared_gate", "shared_up", "shared_down", "shared_expert_gate"])
def test_shared_weights_in_another_dtype_are_refused_before_any_launch(weight, monkeypatch):
    spec = SPECS["dsv3_fp16"].replace(shared_gate=True)
    w = random_weights(spec)
    setattr(w, weight, getattr(w, weight).float())
    launched = []
    monkeypatch.setattr(preamble, "norm_quant", lambda *a, **k: launched.append(1))
    with pytest.raises(experts.Unsupported, match=weight):
        layer.moe_layer(spec, torch.randn(2, spec.hidden_size).half(), w)
    assert not launched
    x = torch.randn(2, spec.hidden_size).half()
    dispatch.fallback_reasons.clear()
    assert torch.equal(_dispatch_layer(spec, x, w), reference.moe_layer(spec, x, w))
    assert len(dispatch.fallback_reasons) == 1


def test_fp8_shared_expert_gate_in_another_dtype_is_refused_before_any_launch(monkeypatch):
    """The fp8 shared expert on the expert kernels (MOE_FUSION_SHARED_FP8) computes its gate in the
    hidden states' dtype."""
    monkeypatch.setattr(layer.options, "shared_fp8", True)
    monkeypatch.setattr(layer.options, "shared_expert", "inline")
    spec = SPECS["dsv3_fp8"].replace(shared_gate=True)
    w = random_weights(spec)
    w.shared_expert_gate = w.shared_expert_gate.float()
    assert layer.plan_layer(spec, 2, torch.device("cpu")).shared_fp8
    launched = []
    monkeypatch.setattr(preamble, "norm_quant", lambda *a, **k: launched.append(1))
    with pytest.raises(experts.Unsupported, match="shared_expert_gate"):
        layer.moe_layer(spec, torch.randn(2, spec.hidden_size).half(), w)
    assert not launched


def test_fp32_layer_runs_the_reference_with_a_reason():
    """The expert kernels take bf16/fp16 activations; an fp32 layer is computed by the reference
    (refused before the preamble launches anything)."""
    spec = dsv3_like()  # float32
    w = _to(random_weights(spec), DEVICE)
    x = torch.randn(3, spec.hidden_size, device=DEVICE)
    dispatch.fallback_reasons.clear()
    assert torch.equal(_dispatch_layer(spec, x, w), reference.moe_layer(spec, x, w))
    (reason,) = dispatch.fallback_reasons.values()
    assert "bf16/fp16" in reason or "float32" in reason


def test_too_many_experts_for_the_routing_tile_route_in_torch():
    """8192 experts in one group exceed the routing and alignment tiles: those stages run the
    reference (plan reasons say so), the result is the reference's."""
    spec = MoESpec(hidden_size=16, num_experts=8192, top_k=4, intermediate_size=8, scoring="sigmoid",
                   renormalize=True, dtype="float32")
    plan = preamble.plan_preamble(spec, 3, torch.float32, torch.float32, torch.device(DEVICE))
    assert plan.route == "reference" and plan.align == "reference" and not plan.fused
    assert any("routing tile" in r for r in plan.reasons)
    g = torch.Generator().manual_seed(0)
    w = MoEWeights(router_weight=torch.randn(8192, 16, generator=g) / 4, w_gate=None, w_up=None, w_down=None)
    x = torch.randn(3, 16, generator=g)
    out = preamble.fused_preamble(spec, x.to(DEVICE), _to(w, DEVICE), block_m=16)
    logits = reference.router_logits(spec, out.normed.cpu(), w.router_weight)
    check_routing(spec, logits, None, out.topk_ids.cpu(), out.topk_weights.cpu(),
                  delta=gemm_error_bound(out.normed.cpu(), w.router_weight))


def test_wrong_shapes_are_clear_errors_before_any_launch():
    spec = SPECS["dsv3_fp16"]
    w = random_weights(spec)
    with pytest.raises(ValueError, match=r"expected hidden states \[M, 48\]"):
        call_moe_layer(spec, torch.randn(2, 47).half(), w)
    with pytest.raises(ValueError, match=r"expected hidden states"):
        call_moe_layer(spec, torch.randn(2, 3, 48).half(), w)
    with pytest.raises(preamble.Unsupported, match="router_weight has shape"):
        preamble.fused_preamble(spec, torch.randn(2, 48).half(), MoEWeights(
            router_weight=w.router_weight[:, :40], w_gate=None, w_up=None, w_down=None, norm_weight=w.norm_weight,
            correction_bias=w.correction_bias), block_m=16)
    with pytest.raises(ValueError, match="w_gate has shape"):
        bad = MoEWeights(**vars(w))
        bad.w_gate = w.w_gate[:, :-1]
        bad.check(spec)


@pytest.mark.parametrize("weight", ["router_weight", "w_down", "correction_bias"])
def test_weights_on_another_device_are_a_clear_error(weight):
    """Checked by dispatch before anything runs: on CUDA a CPU tensor would reach a kernel as a bad
    pointer, and the reference mixes meta and CPU tensors into an uninitialised result without an
    error. (Through the op, a meta argument makes torch dispatch to the op's fake instead; CUDA
    with CPU arguments reaches dispatch.) A meta tensor stands in for "another device" here."""
    spec = SPECS["dsv3_fp16"]
    w = random_weights(spec)
    setattr(w, weight, getattr(w, weight).to("meta"))
    x = torch.randn(2, spec.hidden_size).half()
    with pytest.raises(ValueError, match=f"{weight} is on meta"):
        dispatch.moe_layer(spec, x, w)
    if weight != "w_down":
        with pytest.raises(ValueError, match=f"{weight} is on meta"):
            dispatch.moe_preamble(spec, x, MoEWeights(router_weight=w.router_weight, w_gate=None, w_up=None,
                                                      w_down=None, norm_weight=w.norm_weight,
                                                      correction_bias=w.correction_bias))
