"""The pass on hand-written MoE modules generated from random specs: each module is written the
way people write MoE code (two families below), compiled with MoEFusionBackend(codegen=False)
and dynamic shapes; the spec the pass records must equal the generating spec, and the compiled
module (now one moe_fusion::moe_layer call, run on the reference path on the CPU) must equal the
eager module at every random M from one graph. Compiles are the slow part: a few dozen cases."""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_fusion import MoEFusionBackend
from moe_fusion.spec import MoESpec
from moe_cases import relative_error
from pass_helpers import TOLERANCE, count_ops
from random_specs import STATS

CASES = range(7000, 7024)


def _param(*shape, gen, scale=None):
    return nn.Parameter(torch.randn(*shape, generator=gen) * (scale if scale is not None else shape[-1] ** -0.5))


class GatheredExperts(nn.Module):
    """Each token's expert matrices gathered by id and applied with einsum (gpt-fast style)."""

    def __init__(self, spec: MoESpec, gen):
        super().__init__()
        E, I, H = spec.num_experts, spec.intermediate_size, spec.hidden_size
        self.w1, self.w3, self.w2 = _param(E, I, H, gen=gen), _param(E, I, H, gen=gen), _param(E, H, I, gen=gen)

    def forward(self, x, ids, weights):
        h = F.silu(torch.einsum("ti,tkoi->tko", x, self.w1[ids])) * torch.einsum("ti,tkoi->tko", x, self.w3[ids])
        out = torch.einsum("tko,tkio->tki", h, self.w2[ids])
        return torch.einsum("tki,tk->ti", out, weights.to(out.dtype))


class SharedExpert(nn.Module):
    def __init__(self, spec: MoESpec, gen):
        super().__init__()
        Is, H = spec.shared_intermediate_size, spec.hidden_size
        self.gate_proj, self.up_proj = nn.Linear(H, Is, bias=False), nn.Linear(H, Is, bias=False)
        self.down_proj = nn.Linear(Is, H, bias=False)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            lin.weight = _param(*lin.weight.shape, gen=gen)
        self.expert_gate = nn.Linear(H, 1, bias=False) if spec.shared_gate else None
        if self.expert_gate is not None:
            self.expert_gate.weight = _param(1, H, gen=gen)

    def forward(self, x):
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if self.expert_gate is None else torch.sigmoid(self.expert_gate(x)) * y


class GroupedSigmoidMoE(nn.Module):
    """DeepSeek-V3 style: optional RMSNorm, fp32 sigmoid scores + correction bias for the choice,
    group-limited top-k (group score: sum of top 2, or max), renormalise (+eps), scale."""

    def __init__(self, spec: MoESpec, gen):
        super().__init__()
        self.spec = spec
        self.norm = nn.RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps) if spec.rms_norm else None
        if self.norm is not None:
            with torch.no_grad():
                self.norm.weight.copy_(1 + 0.1 * torch.randn(spec.hidden_size, generator=gen))
        self.router = _param(spec.num_experts, spec.hidden_size, gen=gen)
        self.e_score_correction_bias = nn.Parameter(0.1 * torch.randn(spec.num_experts, generator=gen))
        self.experts = GatheredExperts(spec, gen)
        self.shared = SharedExpert(spec, gen) if spec.has_shared_experts else None

    def forward(self, h):
        s = self.spec
        x = self.norm(h) if self.norm is not None else h
        scores = torch.sigmoid(F.linear(x.float(), self.router.float()))
        choice = scores + self.e_score_correction_bias
        M = choice.shape[0]
        grouped = choice.view(M, s.n_group, -1)
        if s.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = torch.topk(group_scores, k=s.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(M, s.n_group, s.experts_per_group).reshape(M, -1)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=s.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if s.renormalize:
            denominator = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denominator + s.renormalize_eps if s.renormalize_eps else denominator)
        weights = weights * s.routed_scaling_factor
        out = self.experts(x, ids, weights)
        return out if self.shared is None else out + self.shared(x)


class SoftmaxTopkMoE(nn.Module):
    """Mixtral / Qwen style: router in the model dtype, softmax in fp32, top-k, optional
    renormalisation, optional shared expert with optional sigmoid gate (Qwen2-MoE)."""

    def __init__(self, spec: MoESpec, gen):
        super().__init__()
        self.spec = spec
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.gate.weight = _param(spec.num_experts, spec.hidden_size, gen=gen)
        self.experts = GatheredExperts(spec, gen)
        self.shared = SharedExpert(spec, gen) if spec.has_shared_experts else None

    def forward(self, x):
        scores = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(scores, self.spec.top_k, dim=-1)
        if self.spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, ids, weights.to(x.dtype))
        return out if self.shared is None else out + self.shared(x)


def random_module_spec(seed: int) -> MoESpec:
    rng = random.Random(seed)
    E = rng.choice([4, 6, 8, 12, 16, 24, 32, 64])
    H = rng.choice([16, 32, 48])
    I = rng.choice([8, 16, 24])
    shared = rng.random() < 0.6
    common = dict(hidden_size=H, num_experts=E, intermediate_size=I, dtype="float32",
                  shared_intermediate_size=rng.choice([I, 2 * I]) if shared else 0)
    if seed % 2 == 0:
        n_group = rng.choice([d for d in (1, 2, 4, 8) if E % d == 0 and E // d >= 2])
        topk_group = rng.randint(1, n_group)
        renormalize = rng.random() < 0.7
        return MoESpec(
            **common, top_k=rng.randint(1 if rng.random() < 0.2 else 2, min(8, topk_group * (E // n_group))), rms_norm=rng.random() < 0.6,
            rms_norm_eps=1e-6, router_fp32=True, scoring="sigmoid", correction_bias=True, n_group=n_group,
            topk_group=topk_group, group_score=rng.choice(["top2_sum", "max"]), renormalize=renormalize,
            renormalize_eps=rng.choice([0.0, 1e-20]) if renormalize else 0.0, routed_scaling_factor=rng.choice([1.0, 2.5]),
        )
    return MoESpec(**common, top_k=rng.randint(1 if rng.random() < 0.2 else 2, min(4, E)), scoring="softmax", renormalize=rng.random() < 0.5,
                   shared_gate=shared and rng.random() < 0.5)


def module_spec(seed: int) -> MoESpec:
    spec = random_module_spec(seed)
    return spec.replace(top_k=1) if seed % 11 == 0 else spec  # one k = 1 case per family


def _build(spec: MoESpec, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    family = GroupedSigmoidMoE if spec.scoring == "sigmoid" else SoftmaxTopkMoE
    return family(spec, gen).eval()


ROUTING_FIELDS = ("hidden_size", "num_experts", "top_k", "scoring", "score_before_topk", "correction_bias", "n_group",
                  "topk_group", "renormalize", "renormalize_eps", "routed_scaling_factor")


def _recorded_spec_matches(recorded: dict, spec: MoESpec, routing_only: bool = False):
    want = dict(vars(spec))
    want.pop("_json", None)
    if routing_only:
        recorded = {k: recorded[k] for k in ROUTING_FIELDS}
        want = {k: want[k] for k in ROUTING_FIELDS}
    for key in ("rms_norm_eps", "renormalize_eps", "routed_scaling_factor"):
        if key in want:
            assert recorded.pop(key) == pytest.approx(want.pop(key), rel=1e-6, abs=1e-30), key
    if spec.dtype == "float32":  # an fp32 router is the same router either way
        recorded.pop("router_fp32", None), want.pop("router_fp32", None)
    assert recorded == want


@pytest.mark.parametrize("seed", CASES)
def test_random_module_is_matched_with_its_spec(seed):
    spec = module_spec(seed)
    model = _build(spec, seed)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    backend = MoEFusionBackend(codegen=False)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    rng = random.Random(seed)
    with torch.no_grad():
        for i, M in enumerate([rng.randint(2, 9), 1, rng.randint(10, 40)]):
            x = torch.randn(M, spec.hidden_size, generator=torch.Generator().manual_seed(seed + i))
            if i == 0:
                torch._dynamo.decorators.mark_unbacked(x, 0)
            got, want = compiled(x), model(x)
            assert relative_error(got, want) < TOLERANCE[torch.float32], (spec, M)
            STATS["pass_outputs_checked"] += 1
    assert counters["stats"]["unique_graphs"] == 1, "recompiled between token counts"
    (layer,) = backend.report.layers
    STATS["pass_cases"] += 1
    if spec.top_k == 1 and layer.status == "partial":
        # Known limitation: with k = 1 the gathered einsum experts trace to GEMM-free products the
        # expert matcher does not recognise; the routing is still fused and the output is right.
        _recorded_spec_matches(dict(layer.spec), spec, routing_only=True)
        STATS["pass_partial_top1"] += 1
        return
    assert layer.status == "matched", backend.report.format_text()
    _recorded_spec_matches(dict(layer.spec), spec)
    assert count_ops(backend.graph_modules[-1], "moe_fusion.moe_layer") == 1


def test_zz_summary():
    print("\nrandomized pass cases:", dict(sorted(STATS.items())))
