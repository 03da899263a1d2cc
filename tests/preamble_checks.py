"""Comparisons of preamble kernel outputs with reference.py, at the tolerances of issue 4:
normed within one step of its dtype (the mean's summation order may flip a rounding), routing
ids equal wherever the reference's choice has no near tie (1e-6), weights to 1e-5 relative,
fp8 values within one e4m3 step of torch's quantisation of the same normed values, scales
bit-equal, alignment exactly equal."""
from __future__ import annotations

import contextlib
import os

import torch

from moe_fusion.lowering import reference, topk_kernel
from moe_fusion.spec import FP8_DTYPE, MoESpec

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TIE = 1e-6


def force_pick_mode(monkeypatch, sort: bool) -> None:
    """Every routing program makes its top-k picks by one sort (sort) or one max per pick, whatever
    its warps (topk_kernel.picks_by_sort chooses by warps), so both paths are tested on every shape."""
    monkeypatch.setattr(topk_kernel, "picks_by_sort", lambda num_warps: sort)


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty returns NaN / -77777-filled tensors, so an element no kernel wrote shows up."""
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        if t.dtype.is_floating_point:
            t.view(torch.uint8).fill_(0x7F) if t.dtype == FP8_DTYPE else t.fill_(float("nan"))
        else:
            t.fill_(-77777)
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def assert_normed_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert not got.isnan().any()
    # The reference rounds twice (x * r to the dtype, then times the weight), so a last-bit
    # difference in r (summation order; torch's CUDA rsqrt is approximate) can move a value by two
    # steps of its dtype (seen on the H100 at dsv3 M=1500: 2^-6 at |x| < 2); fp32 keeps such
    # differences as a few ulps.
    steps = 4 if ref.dtype == torch.float32 else 2
    magnitude = torch.maximum(got.float().abs(), ref.float().abs()).clamp(min=torch.finfo(ref.dtype).tiny)
    step = steps * torch.finfo(ref.dtype).eps * magnitude
    diff = (got.float() - ref.float()).abs()
    assert (diff <= step * 1.01).all(), f"normed off by more than {steps} step(s): {diff.max().item()}"
    if ref.dtype != torch.float32:
        assert (diff > 0).float().mean() < 0.01, "too many normed values off by one step"


def _fp8_step(v: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -6)))
    return torch.exp2(exponent - 3)


def assert_fp8_matches(normed: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Kernel quantisation of ``normed`` against torch's quantisation of the same values."""
    ref_q, ref_scale = reference.quantize_fp8_groups(normed)
    assert q.dtype == FP8_DTYPE and q.shape == ref_q.shape and scale.shape == ref_scale.shape
    # The kernel divides amax by 448 (as torch does on the CPU); torch on CUDA multiplies by 1/448
    # instead, which can land one fp32 step away.
    torch.testing.assert_close(scale, ref_scale, rtol=2.5e-7, atol=0)
    got, want = q.float(), ref_q.float()
    assert not got.isnan().any()
    ok = (got - want).abs() <= _fp8_step(want)
    if INTERPRETED:  # interpreter fault: rounding up across a power of two loses the carry
        ok |= (got * 2 == want) & (torch.log2(want.abs()) == torch.round(torch.log2(want.abs())))
    assert ok.all(), f"{(~ok).sum().item()} fp8 values off by more than one step"


def _choice(spec: MoESpec, logits: torch.Tensor, bias):
    """The values the reference's top-k picks from, with its group mask; and group scores or None."""
    if not spec.score_before_topk:
        return logits, None
    scores = reference._score(spec.scoring, logits)
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    if not spec.grouped:
        return choice, None
    grouped = choice.view(choice.shape[0], spec.n_group, spec.experts_per_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        group_scores = grouped.amax(-1)
    return reference._group_limited(spec, choice), group_scores


def _no_tie(values: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k best values and the next one are all separated by at least TIE."""
    n = min(k + 1, values.shape[1])
    top = values.topk(n, dim=-1).values
    finite = torch.isfinite(top)
    gaps = (top[:, :-1] - top[:, 1:]).abs()
    return ((gaps >= TIE) | ~finite[:, 1:]).all(-1) if n > 1 else torch.ones(values.shape[0], dtype=torch.bool)


def clean_rows(spec: MoESpec, logits: torch.Tensor, bias) -> torch.Tensor:
    choice, group_scores = _choice(spec, logits, bias)
    clean = _no_tie(choice, spec.top_k)
    if group_scores is not None:
        clean &= _no_tie(group_scores, spec.topk_group)
    return clean


def near_rounding_boundary(spec: MoESpec, normed: torch.Tensor, router_weight: torch.Tensor,
                           logits: torch.Tensor):
    """(near [M, E], other [M, E]): the logits that decide the routing and sit so close to a rounding
    boundary of the model dtype that a different fp32 summation order could round them the other
    way, and every logit's other rounding (equal to ``logits`` where not near). A model-dtype router
    rounds its logits, and the kernel's split-K order is not cuBLAS's. Two fp32 sums of the same H
    products differ by the rounding of their partial sums, which for a logit with cancellation is far
    more than 1e-6 of its value (the band used before; seen on the H100 in v3: 16 of 1640 weights
    off at M=300, qwen3 / mixtral failures at M=1500). An fp32 sum of H random-sign products rounds
    to about 0.25 * 2^-24 of the sum of |products| (one standard deviation; 1.7e-7 of it at most over
    300 x 128 sequential sums on the CPU), so the band is 2^-22 of that sum: 16 deviations."""
    exact = normed.double() @ router_weight.double().T
    band = 2.0 ** -22 * (normed.double().abs() @ router_weight.double().abs().T)
    lo, hi = (exact - band).to(normed.dtype), (exact + band).to(normed.dtype)
    near = lo != hi
    # Logits that matter: the top k (weights), the next one (which k are picked), with groups each
    # group's top 3 (its score, the order inside it), and through a softmax denominator (no
    # renormalisation) any logit whose one-step change moves the weights by more than 1e-6.
    relevant = torch.zeros_like(near)
    choice, _ = _choice(spec, logits.double(), None)
    relevant.scatter_(1, choice.topk(min(spec.top_k + 1, choice.shape[1]), dim=-1).indices, True)
    if spec.grouped:
        scores = reference._score(spec.scoring, logits.double()).view(-1, spec.n_group, spec.experts_per_group)
        top = scores.topk(min(3, spec.experts_per_group), dim=-1).indices
        top = top + torch.arange(spec.n_group, device=top.device)[None, :, None] * spec.experts_per_group
        relevant.scatter_(1, top.flatten(1), True)
    if spec.score_before_topk and spec.scoring == "softmax" and not spec.renormalize:
        step = torch.finfo(normed.dtype).eps * logits.double().abs()
        relevant |= torch.softmax(logits.double(), dim=-1) * step > 1e-6
    other = torch.where(logits.double() == lo.double(), hi.double(), lo.double()).to(logits.dtype)
    return near & relevant, torch.where(near, other, logits)


def _rows_match(spec: MoESpec, logits, bias, ids, weights) -> torch.Tensor:
    ref_ids, ref_weights = reference.select_experts(spec, logits, bias)
    close = torch.isclose(weights, ref_weights.float(), rtol=1e-5, atol=1e-6).all(-1)
    return (ids == ref_ids).all(-1) & close


def assert_routing_matches(spec: MoESpec, normed: torch.Tensor, router_weight, bias, ids, weights,
                           min_clean: float = 0.5) -> None:
    """Kernel routing against the reference's routing of the same normed input. The reference GEMM
    runs without cuBLAS's reduced-precision (half-precision split-K) reductions: the kernels round
    fp32-accumulated logits once, which is what the reference means."""
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    reduced_fp16 = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        logits = reference.router_logits(spec, normed, router_weight)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced_fp16
    ref_ids, ref_weights = reference.select_experts(spec, logits, bias)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == ref_ids.shape and weights.shape == ref_weights.shape
    assert ((ids >= 0) & (ids < spec.num_experts)).all()
    assert not weights.isnan().any()
    double_bias = None if bias is None else bias.double()
    clean = clean_rows(spec, logits.double(), double_bias)
    if not spec.router_fp32 and normed.dtype != torch.float32:
        # A row with one logit at a rounding boundary may follow either rounding: it is checked
        # against the routing of both; rows with more such logits are left out.
        near, other = near_rounding_boundary(spec, normed, router_weight, logits)
        n_near = near.sum(-1)
        clean &= (n_near == 0) | ((n_near == 1) & clean_rows(spec, other.double(), double_bias))
    assert clean.float().mean() >= min_clean, "too few rows without near ties to test anything"
    if not spec.router_fp32 and normed.dtype != torch.float32:
        clean &= ~((n_near == 1) & _rows_match(spec, other, bias, ids, weights))  # the other rounding's routing
    assert torch.equal(ids[clean], ref_ids[clean])
    torch.testing.assert_close(weights[clean], ref_weights[clean].float(), rtol=1e-5, atol=1e-6)


def assert_alignment_matches(out, expert_map, num_local_experts: int, block_m: int) -> None:
    want = reference.align_pairs(out.topk_ids, expert_map, num_local_experts, block_m)
    for name, got, ref in zip(("sorted_pair_ids", "tile_expert", "num_tiles"), out[-3:], want):
        assert got.dtype == torch.int32 and torch.equal(got, ref), f"{name} differs from reference.align_pairs"


def check_preamble(spec: MoESpec, x: torch.Tensor, w, out, block_m: int, expert_map=None, min_clean=0.5) -> None:
    """Every output of fused_preamble against the reference (see the module doc)."""
    ref = reference.moe_preamble(spec, x, w)[0] if spec.rms_norm else x
    assert_normed_close(out.normed, ref)
    if spec.fp8:
        assert_fp8_matches(out.normed, out.x_fp8, out.x_scale)
    else:
        assert out.x_fp8.numel() == 0 and out.x_scale.numel() == 0
    bias = w.correction_bias if spec.correction_bias else None
    assert_routing_matches(spec, out.normed, w.router_weight, bias, out.topk_ids, out.topk_weights, min_clean)
    assert_alignment_matches(out, expert_map if expert_map is not None else w.expert_map, spec.num_local_experts,
                             block_m)


def one_launch_plan(spec: MoESpec, M: int, device, dtype=None, fused: bool = True, route_align: bool = False):
    """The one-launch router + routing + alignment plan (``fused=False``: the general multi-launch
    path, with ``route_align`` routing and alignment in one program), whatever the planner would
    pick for this M."""
    from moe_fusion.lowering import preamble

    dtype = dtype or spec.torch_dtype
    plan = preamble.plan_preamble(spec, M, dtype, dtype, torch.device(device))
    plan.fused, plan.align = fused, "fused" if fused else ("with_routing" if route_align else "kernel")
    sms = preamble._sm_count(None if torch.device(device).type == "cpu" else 0)
    plan.router = preamble.router_config(M, spec.num_experts, spec.hidden_size, preamble._dot_fp32(spec, dtype, dtype),
                                         sms, fused)
    return plan


def real_shapes() -> dict:
    """The benchmark shapes of DESIGN.md (router side only), bf16, norm fused in front."""
    dsv3 = MoESpec(hidden_size=7168, num_experts=256, top_k=8, intermediate_size=2048, rms_norm=True,
                   router_fp32=True, scoring="sigmoid", correction_bias=True, n_group=8, topk_group=4,
                   renormalize=True, renormalize_eps=1e-20, routed_scaling_factor=2.5, shared_intermediate_size=2048,
                   quant="fp8_block")
    return {
        "dsv3": dsv3,
        "dsv3-ep8": dsv3.replace(num_local_experts=32),
        "qwen3-30b-a3b": MoESpec(hidden_size=2048, num_experts=128, top_k=8, intermediate_size=768, rms_norm=True,
                                 scoring="softmax", renormalize=True),
        "mixtral": MoESpec(hidden_size=4096, num_experts=8, top_k=2, intermediate_size=14336, rms_norm=True,
                           scoring="softmax", renormalize=True),
    }


def preamble_weights(spec: MoESpec, device, seed: int = 0):
    """Random router-side weights (never zeros); expert weights are not needed by the preamble."""
    from moe_fusion.spec import MoEWeights

    g = torch.Generator().manual_seed(seed)
    H, E, dt = spec.hidden_size, spec.num_experts, spec.torch_dtype
    w = MoEWeights(router_weight=(torch.randn(E, H, generator=g) / H ** 0.5).to(dt).to(device),
                   w_gate=None, w_up=None, w_down=None)
    if spec.rms_norm:
        w.norm_weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dt).to(device)
    if spec.correction_bias:
        w.correction_bias = (0.1 * torch.randn(E, generator=g)).to(device)
    if spec.expert_parallel:  # this rank owns every (E / L)-th expert
        stride = E // spec.num_local_experts
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[torch.arange(spec.num_local_experts) * stride] = torch.arange(spec.num_local_experts,
                                                                                 dtype=torch.int32)
        w.expert_map = expert_map.to(device)
    return w
