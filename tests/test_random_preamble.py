"""Randomized differential tests of the preamble kernels (TRITON_INTERPRET=1 on the CPU, small H)
against reference.py: the routing kernel on random logits, the whole fused preamble (norm, fp8,
router, routing, alignment; decode and general paths) on random specs and inputs, and the
alignment kernel on random ids. Seeds are fixed: a failure names the case that reproduces it.
Tie handling: random_specs.check_routing."""

import os

import torch

import pytest

from moe_fusion.lowering import align_kernel, preamble, reference, topk_kernel
from moe_fusion.spec import MoESpec, MoEWeights
from moe_cases import DEVICE
from preamble_checks import (
    assert_alignment_matches, assert_fp8_matches, assert_normed_close, force_pick_mode, one_launch_plan,
    poisoned_empty,
)
from random_specs import (
    STATS, check_routing, gemm_error_bound, input_kind, random_expert_map, random_hidden, random_layer_weights,
    random_logits, random_m, random_spec, seeds,
)

ROUTING_CASES = seeds(0, 160)
PREAMBLE_CASES = seeds(1000, 150)
ALIGN_CASES = seeds(2000, 60)


@pytest.mark.parametrize("seed", ROUTING_CASES)
def test_random_routing_kernel(seed, monkeypatch):
    force_pick_mode(monkeypatch, seed % 2 == 1)  # the picks one by one, or by one sort
    spec = random_spec(seed)
    kind = input_kind(seed)
    M = random_m(seed, big=40)
    logits = random_logits(spec, M, seed, kind).to(DEVICE)
    bias = random_layer_weights(spec, seed, kind, experts=False).correction_bias
    bias = bias.to(DEVICE) if bias is not None else None
    model_dtype = spec.torch_dtype
    with poisoned_empty():
        ids, weights = topk_kernel.select_experts(spec, logits, bias, model_dtype)
    # A model-dtype router's logits are rounded to that dtype; the kernel does it in its epilogue.
    seen = logits if spec.router_fp32 or model_dtype == torch.float32 else logits.to(model_dtype).float()
    check_routing(spec, seen.cpu(), None if bias is None else bias.cpu(), ids.cpu(), weights.cpu())
    STATS["routing_cases"] += 1


def _logit_uncertainty(spec: MoESpec, normed: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """How far the kernel's logits may be from the reference's: fp32 summation order, and for a
    model-dtype router one rounding step of that dtype where the exact logit sits that close to a
    rounding boundary."""
    rw = router_weight.float() if spec.router_fp32 else router_weight.to(normed.dtype).float()
    bound = gemm_error_bound(normed.float(), rw)
    if spec.router_fp32 or normed.dtype == torch.float32:
        return bound
    exact = normed.double() @ rw.double().T
    lo, hi = (exact - bound[:, None]).to(normed.dtype), (exact + bound[:, None]).to(normed.dtype)
    straddles = (lo != hi).any(-1)
    step = torch.finfo(normed.dtype).eps * exact.abs().amax(-1)
    return bound + torch.where(straddles, step, 0.0)


@pytest.mark.parametrize("seed", PREAMBLE_CASES)
def test_random_fused_preamble(seed, monkeypatch):
    force_pick_mode(monkeypatch, seed % 3 == 1)
    spec = random_spec(seed)
    kind = input_kind(seed)
    M = random_m(seed)
    w = random_layer_weights(spec, seed, kind, experts=False)
    x = random_hidden(spec, M, seed, kind)
    block_m = [1, 4, 16, 64][seed % 4]
    w_dev = MoEWeights(**{f: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for f, t in vars(w).items()})
    plan = preamble.plan_preamble(spec, M, x.dtype, w.router_weight.dtype, torch.device(DEVICE))
    if seed % 2 == 0 and 0 < M <= 16 and plan.route == "kernel" and plan.align != "reference":
        plan = one_launch_plan(spec, M, DEVICE, x.dtype)  # the planner picks it rarely; test it anyway
    with poisoned_empty():
        out = preamble.fused_preamble(spec, x.to(DEVICE), w_dev, block_m, plan=plan)
    out = type(out)(*(t.cpu() for t in out))

    ref_normed = reference.moe_preamble(spec, x, w)[0] if spec.rms_norm else x
    if M:
        assert_normed_close(out.normed, ref_normed)
    assert out.normed.shape == (M, spec.hidden_size)
    if spec.fp8:
        assert_fp8_matches(out.normed, out.x_fp8, out.x_scale)
    else:
        assert out.x_fp8.numel() == 0 and out.x_scale.numel() == 0
    # Routing of the kernel's own normed states (the norm's last-bit differences are checked above).
    logits = reference.router_logits(spec, out.normed, w.router_weight)
    bias = w.correction_bias if spec.correction_bias else None
    check_routing(spec, logits, bias, out.topk_ids, out.topk_weights,
                  delta=_logit_uncertainty(spec, out.normed, w.router_weight), stats="preamble")
    assert_alignment_matches(out, w.expert_map, spec.num_local_experts, block_m)
    STATS["preamble_cases"] += 1
    STATS[f"preamble_path_{'fused' if M and plan.fused else 'general' if M else 'empty'}"] += 1


@pytest.mark.parametrize("seed", ALIGN_CASES)
def test_random_align_kernel(seed):
    g = torch.Generator().manual_seed(seed)
    spec = random_spec(seed)
    M = random_m(seed, big=300)
    k, E, L = spec.top_k, spec.num_experts, spec.num_local_experts
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]) if M else torch.zeros(0, k)
    ids = ids.to(torch.int32)
    expert_map = random_expert_map(E, L, g) if L != E else None
    block_m = [1, 3, 16, 64][seed % 4]
    if M == 0:
        got = preamble.reference.align_pairs(ids, expert_map, L, block_m)  # the kernel is never launched at M=0
    else:
        with poisoned_empty():
            got = align_kernel.align_pairs(ids.to(DEVICE), None if expert_map is None else expert_map.to(DEVICE),
                                           L, block_m)
    want = reference.align_pairs(ids, expert_map, L, block_m)
    for name, a, b in zip(("sorted_pair_ids", "tile_expert", "num_tiles"), got, want):
        assert torch.equal(a.cpu(), b), name
    STATS["align_cases"] += 1


# --------------------------------------------------------------------------- the tie rule
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("sort_picks", [False, True], ids=["picks-one-by-one", "picks-by-sort"])
def test_tie_rule_lower_index_first_and_repeatable(scoring, before, sort_picks, monkeypatch):
    """Exactly equal choice values: the kernel takes the lower expert index first, every time."""
    force_pick_mode(monkeypatch, sort_picks)
    spec = MoESpec(hidden_size=8, intermediate_size=8, num_experts=24, top_k=5, scoring=scoring,
                   score_before_topk=before, renormalize=True)
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 4, (33, 24), generator=g).float()  # four distinct values: ties everywhere
    ids, weights = topk_kernel.select_experts(spec, logits.to(DEVICE), None, torch.float32)
    again, weights_again = topk_kernel.select_experts(spec, logits.to(DEVICE), None, torch.float32)
    assert torch.equal(ids, again) and torch.equal(weights, weights_again)
    for r in range(logits.shape[0]):
        want = sorted(range(24), key=lambda e: (-logits[r, e].item(), e))[: spec.top_k]
        assert ids[r].tolist() == want
    check_routing(spec, logits, None, ids.cpu(), weights.cpu())


def test_tie_rule_for_groups():
    """Tied group scores: the lower group index is kept."""
    spec = MoESpec(hidden_size=8, intermediate_size=8, num_experts=16, top_k=2, scoring="none", n_group=4,
                   topk_group=1, group_score="max")
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.9]])
    ids, _ = topk_kernel.select_experts(spec, logits.to(DEVICE), None, torch.float32)
    assert ids.tolist() == [[1, 0]]  # groups 0, 1 and 3 tie at 1.0: group 0 is kept


@pytest.mark.parametrize("corruption", ["swap_order", "worst_expert", "weight", "nan_weight"])
def test_check_routing_catches_wrong_routing(corruption):
    """The checker itself can fail: a wrong answer on an untied row is caught."""
    spec = MoESpec(hidden_size=8, intermediate_size=8, num_experts=32, top_k=4, scoring="sigmoid", n_group=4,
                   topk_group=2, correction_bias=True, renormalize=True)
    logits = torch.randn(6, 32)
    bias = 0.1 * torch.randn(32)
    ids, weights = reference.select_experts(spec, logits, bias)
    ids, weights = ids.clone(), weights.float().clone()
    check_routing(spec, logits, bias, ids, weights)
    if corruption == "swap_order":
        ids[0, [0, 1]] = ids[0, [1, 0]]
    elif corruption == "worst_expert":
        ids[0, -1] = int(logits[0].argmin())
    elif corruption == "weight":
        weights[0, 0] *= 1 + 1e-4
    else:
        weights[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        check_routing(spec, logits, bias, ids, weights)


def test_zz_summary():
    print("\nrandomized preamble cases:", dict(sorted(STATS.items())))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("the tie share counts this process's cases only: under pytest-xdist a worker holds a "
                    "fraction of them (run without -n for this check)")
    if STATS["preamble_rows"]:
        assert STATS["preamble_tied_rows"] < 0.5 * STATS["preamble_rows"], "too few untied rows to test ids exactly"
