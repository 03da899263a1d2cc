"""Seeded random MoE layers for the randomized differential tests (tests/test_random_*.py).

Every case is a function of its integer seed, so CI runs the same cases every time and a
failure names the seed that reproduces it: ``random_spec(seed)``, ``random_layer_weights``,
``random_hidden``. The generators cover the whole MoESpec space the kernels claim: 2..512
experts, groups (top2_sum / max), top-k 1..16, softmax / sigmoid / raw scoring before or after
the top-k, correction bias, renormalisation with and without eps, scaling, weight on output or
input, shared experts with and without gate, fp16 / fp32 / bf16, fp8 blocks, expert parallelism
with a scattered expert_map. Inputs come in three kinds: normal, large magnitudes, and exact ties
(experts whose router rows are copies of each other, so every token sees tied logits).

Routing comparisons use ``check_routing``: the tie rule is written out in its docstring.
"""
from __future__ import annotations

import collections
import math
import os
import random
from typing import Optional

import torch

from moe_fusion.lowering import reference
from moe_fusion.spec import MoESpec, MoEWeights

# Cases and rows each test module ran, printed by its summary test (the CI log shows them).
STATS = collections.Counter()

# MOE_FUSION_RANDOM_SCALE=N runs N times as many cases of every family (the GPU run: many more
# than CI); seeds stay disjoint between families as long as each has fewer than 1000 cases.
RANDOM_SCALE = int(os.environ.get("MOE_FUSION_RANDOM_SCALE", "1"))


def seeds(first: int, count: int) -> range:
    """The seeds of one family: ``count`` from ``first`` in CI, scaled by MOE_FUSION_RANDOM_SCALE."""
    start = first * RANDOM_SCALE
    return range(start, start + count * RANDOM_SCALE)


TIE = 1e-6
INPUT_KINDS = ("normal", "normal", "large", "ties")


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def random_spec(seed: int, dtypes=("float16", "float32"), fp8: bool = True, max_experts: int = 512,
                hidden=(8, 200), inter=(8, 48), shared: bool = True) -> MoESpec:
    """A valid random MoESpec; ``dtypes``/``fp8`` restrict what the caller's kernels can run."""
    rng = random.Random(seed)
    E = max(2, min(max_experts, int(round(2 ** rng.uniform(1, math.log2(max_experts))))))
    before = rng.random() > 0.2
    n_group = 1
    if before and rng.random() < 0.45:
        n_group = rng.choice([d for d in _divisors(E) if 1 < d <= 16] or [1])
    epg = E // n_group
    group_score = rng.choice(["top2_sum", "max"]) if epg >= 2 else "max"
    topk_group = rng.randint(1, n_group)
    top_k = rng.randint(1, min(16, topk_group * epg))
    if rng.random() < 0.3:  # favour the common small k
        top_k = min(top_k, rng.choice([1, 2]))
    renormalize = rng.random() < 0.5
    quant = "fp8_block" if fp8 and rng.random() < 0.25 else "none"
    H = rng.randint(*hidden)
    I = rng.randint(*inter)
    shared_size, shared_gate = 0, False
    if shared and rng.random() < 0.4:
        shared_size = rng.choice([I, 2 * I, rng.randint(8, 40)])
        shared_gate = rng.random() < 0.5
    num_local = E
    if rng.random() < 0.25:
        num_local = rng.randint(1, E)
    return MoESpec(
        hidden_size=H, num_experts=E, top_k=top_k, intermediate_size=I, num_local_experts=num_local,
        rms_norm=rng.random() < 0.6, rms_norm_eps=rng.choice([1e-6, 1e-5]),
        router_fp32=rng.random() < 0.5,
        scoring=rng.choice(["softmax", "sigmoid", "none"]), score_before_topk=before,
        correction_bias=before and rng.random() < 0.4,
        n_group=n_group, topk_group=topk_group, group_score=group_score,
        renormalize=renormalize, renormalize_eps=rng.choice([0.0, 1e-20, 1e-6]) if renormalize else 0.0,
        routed_scaling_factor=rng.choice([1.0, 2.5, round(rng.uniform(0.1, 16.0), 3)]),
        weight_on="input" if rng.random() < 0.2 else "output",
        shared_intermediate_size=shared_size, shared_gate=shared_gate,
        dtype=rng.choice(dtypes), quant=quant,
    )


def input_kind(seed: int) -> str:
    return random.Random(seed * 7 + 3).choice(INPUT_KINDS)


def random_m(seed: int, big: int = 100) -> int:
    """Token counts weighted towards decode: 0, 1, small, and now and then past the fused path."""
    rng = random.Random(seed * 13 + 1)
    r = rng.random()
    if r < 0.08:
        return 0
    if r < 0.25:
        return 1
    if r < 0.9:
        return rng.randint(2, 24)
    return rng.randint(min(65, big), big)


def random_expert_map(num_experts: int, num_local: int, gen: torch.Generator) -> torch.Tensor:
    """Global id -> local id for a rank that owns ``num_local`` scattered experts, in shuffled order."""
    owned = torch.randperm(num_experts, generator=gen)[:num_local]
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[owned] = torch.randperm(num_local, generator=gen).to(torch.int32)
    return expert_map


def random_layer_weights(spec: MoESpec, seed: int, kind: str = "normal", experts: bool = True) -> MoEWeights:
    """Fresh random weights (never zeros) in canonical form; ``kind="ties"`` copies router rows so
    that some experts always tie; ``experts=False`` leaves the expert weights out (preamble tests)."""
    g = torch.Generator().manual_seed(seed)
    dt = spec.torch_dtype
    E, H, I, Is = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.shared_intermediate_size

    def mat(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dt)

    router = mat(spec.num_experts, H)
    if kind == "ties":
        copies = max(1, spec.num_experts // 4)
        src = torch.randint(0, spec.num_experts, (copies,), generator=g)
        dst = torch.randint(0, spec.num_experts, (copies,), generator=g)
        router[dst] = router[src].clone()
    w = MoEWeights(router_weight=router, w_gate=None, w_up=None, w_down=None)
    if experts:
        w.w_gate, w.w_up, w.w_down = mat(E, I, H), mat(E, I, H), mat(E, H, I)
        if spec.fp8:
            w.w_gate, w.w_gate_scale = reference.quantize_fp8_blocks(w.w_gate)
            w.w_up, w.w_up_scale = reference.quantize_fp8_blocks(w.w_up)
            w.w_down, w.w_down_scale = reference.quantize_fp8_blocks(w.w_down)
        if spec.has_shared_experts:
            w.shared_gate, w.shared_up, w.shared_down = mat(Is, H), mat(Is, H), mat(H, Is)
        if spec.shared_gate:
            w.shared_expert_gate = mat(1, H)
    if spec.rms_norm:
        w.norm_weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dt)
    if spec.correction_bias:
        bias = 0.1 * torch.randn(spec.num_experts, generator=g)
        if kind == "ties":  # tied router rows stay tied after the bias
            bias[dst] = bias[src].clone()
        w.correction_bias = bias
    if spec.expert_parallel:
        w.expert_map = random_expert_map(spec.num_experts, spec.num_local_experts, g)
    return w


def random_hidden(spec: MoESpec, M: int, seed: int, kind: str = "normal", large: float = 300.0) -> torch.Tensor:
    """x [M, H] in the spec's dtype; "large" scales it (fp16 stays far from overflow), "ties" repeats rows."""
    g = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn(M, spec.hidden_size, generator=g)
    if kind == "large":
        x = x * large
    elif kind == "ties" and M >= 2:
        x[M - M // 2:] = x[: M // 2].clone()
    return x.to(spec.torch_dtype)


def random_logits(spec: MoESpec, M: int, seed: int, kind: str = "normal") -> torch.Tensor:
    """fp32 router logits [M, E]: normal, large (x100), or ties (values on a coarse grid, so many
    experts share exactly the same logit)."""
    g = torch.Generator().manual_seed(seed + 777)
    logits = torch.randn(M, spec.num_experts, generator=g)
    if kind == "large":
        logits = logits * 100
    elif kind == "ties":
        logits = torch.round(logits * 2) / 2
    return logits


# --------------------------------------------------------------------------- routing comparison
def _choice64(spec: MoESpec, logits: torch.Tensor, bias: Optional[torch.Tensor]):
    """float64 values the top-k picks from (no group mask), and the float64 scores."""
    logits = logits.double()
    if not spec.score_before_topk:
        return logits, None
    scores = reference._score(spec.scoring, logits)
    return (scores if bias is None else scores + bias.double()), scores


def _group_scores(spec: MoESpec, choice: torch.Tensor) -> torch.Tensor:
    grouped = choice.view(choice.shape[0], spec.n_group, spec.experts_per_group)
    if spec.group_score == "top2_sum":
        return grouped.topk(2, dim=-1).values.sum(-1)
    return grouped.amax(-1)


def _kth_gaps_clean(values: torch.Tensor, k: int, tol: torch.Tensor) -> torch.Tensor:
    n = min(k + 1, values.shape[1])
    if n < 2:
        return torch.ones(values.shape[0], dtype=torch.bool)
    top = values.topk(n, dim=-1).values
    gaps = top[:, :-1] - top[:, 1:]
    return ((gaps >= tol[:, None]) | ~torch.isfinite(top[:, 1:])).all(-1)


def expected_weights(spec: MoESpec, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """reference.select_experts' weights for the experts ``ids`` (float64): what any valid choice
    of experts must come with."""
    logits = logits.double()
    idx = ids.long()
    if spec.score_before_topk:
        weights = reference._score(spec.scoring, logits).gather(1, idx)
    else:
        weights = reference._score(spec.scoring, logits.gather(1, idx))
    if spec.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + spec.renormalize_eps)
    return weights * spec.routed_scaling_factor


def _weight_rtol(spec: MoESpec, logits: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Relative tolerance per row: 1e-5, plus what a logit error ``delta`` moves a score by (at most
    2 delta for softmax), times the renormalisation's condition number sum|w| / |sum w|."""
    rtol = 1e-5 + 4 * delta
    if spec.renormalize:
        raw = expected_weights(spec.replace(renormalize=False, routed_scaling_factor=1.0), logits, ids)
        cond = raw.abs().sum(-1) / (raw.sum(-1).abs() + spec.renormalize_eps).clamp(min=1e-300)
        rtol = rtol * cond.clamp(min=1.0)
    return rtol


def check_routing(spec: MoESpec, logits: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
                  weights: torch.Tensor, delta: Optional[torch.Tensor] = None, stats: str = "routing") -> torch.Tensor:
    """Kernel routing (ids int32, weights fp32 [M, k]) against reference.select_experts on ``logits``.

    The tie rule. ``delta`` [M] bounds how far the kernel's logits may be from ``logits`` (0 when
    the kernel read these very logits; the router GEMM's rounding bound otherwise). A row is
    *tied* when, in float64, any gap between its k+1 best choice values is below TIE + 4 * delta
    (scores move by at most 2 delta), or, with groups, any gap between its topk_group+1 best
    group scores is below TIE + 8 * delta. Then:
      * untied rows: ids equal the reference's exactly (same experts, same order);
      * tied rows: the ids are *a* valid choice: distinct, in range, from groups whose score is
        within the tolerance of the kept groups', and no expert left out of a used group (or of a
        group that is kept beyond doubt) beats a chosen one by more than the tolerance. Among
        exactly equal values the kernels take the lower expert index (torch.topk on the CPU does
        not promise any order), which ``test_tie_rule_*`` pins down;
      * every row: the weights are the reference's weights *of the chosen ids* (rel 1e-5 plus
        what delta explains; NaN where the reference's are NaN).
    Returns the tied-row mask.
    """
    M, k = ids.shape
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert weights.shape == (M, spec.top_k) and ids.shape == (M, spec.top_k)
    delta = torch.zeros(M, dtype=torch.float64) if delta is None else delta.double()
    if M == 0:
        return torch.zeros(0, dtype=torch.bool)
    assert ((ids >= 0) & (ids < spec.num_experts)).all(), "expert id out of range"
    assert (ids.long().sort(-1).values.diff(dim=-1) != 0).all(), "an expert picked twice"

    ref_ids, _ = reference.select_experts(spec, logits, bias)
    choice, _ = _choice64(spec, logits, bias)
    tol = TIE + 4 * delta
    finite_rows = torch.isfinite(choice).all(-1)
    clean = finite_rows.clone()
    group_scores = None
    if spec.grouped:
        group_scores = _group_scores(spec, choice)
        clean &= _kth_gaps_clean(group_scores, spec.topk_group, TIE + 8 * delta)
        masked = reference._group_limited(spec, choice)
    else:
        masked = choice
    clean &= _kth_gaps_clean(masked, k, tol)
    assert torch.equal(ids[clean], ref_ids[clean]), "ids differ on rows without a tie"

    for r in torch.nonzero(~clean & finite_rows).flatten().tolist():
        _assert_valid_choice(spec, choice[r], None if group_scores is None else group_scores[r],
                             ids[r].long(), float(tol[r]))

    want = expected_weights(spec, logits, ids)
    got = weights.double()
    nan_want = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan_want), "weights are NaN on other rows than the reference's"
    rtol = _weight_rtol(spec, logits, ids, delta)[:, None]
    atol = 1e-6 * max(1.0, spec.routed_scaling_factor)
    err = (got - want).abs()
    ok = nan_want | (err <= atol + rtol * want.abs()) | (got == want)
    assert ok.all(), f"weights off: max err {err[~ok].max().item():.3g} at rows {torch.nonzero(~ok)[:4].tolist()}"

    STATS[f"{stats}_rows"] += M
    STATS[f"{stats}_tied_rows"] += int((~clean).sum())
    return ~clean


def _assert_valid_choice(spec: MoESpec, choice: torch.Tensor, group_scores, ids: torch.Tensor, tol: float):
    chosen = torch.zeros_like(choice, dtype=torch.bool)
    chosen[ids] = True
    group_of = torch.arange(spec.num_experts) // spec.experts_per_group
    considered = torch.ones_like(chosen)  # experts that must not beat a chosen one
    if group_scores is not None:
        kth = group_scores.topk(spec.topk_group).values[-1]
        used = torch.unique(group_of[ids])
        assert len(used) <= spec.topk_group, "experts from more groups than topk_group"
        assert (group_scores[used] >= kth - 2 * tol).all(), "an expert from a group that is not among the best"
        surely_kept = torch.nonzero(group_scores > kth + 2 * tol).flatten()
        considered = torch.isin(group_of, torch.cat([used, surely_kept]))
    worst_chosen = choice[ids].min()
    others = choice[considered & ~chosen]
    if others.numel():
        assert others.max() <= worst_chosen + tol, "a left-out expert beats a chosen one by more than the tie tolerance"
    STATS["valid_choice_rows"] += 1


def gemm_error_bound(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row of a @ w^T in fp32: a bound (statistical, 4 sqrt(K) units of rounding) on how much
    two summation orders can differ, relative to the sum of |terms|."""
    K = a.shape[1]
    magnitude = (a.double().abs() @ w.double().abs().T).amax(-1)
    return 4 * math.sqrt(K) * 2.0 ** -24 * magnitude
