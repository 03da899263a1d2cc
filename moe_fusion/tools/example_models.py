"""Hand-written models for ``moe-fusion inspect`` and the pass tests: MoE code written the way
people write it outside HF transformers, plus models that must *not* match.

Each factory returns a module in eval mode with random weights and takes no arguments; every
module maps token hidden states [tokens, hidden] (or token ids, for ``sampler``) to an output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 64


def _randn(*shape, gen):
    return nn.Parameter(torch.randn(*shape, generator=gen) / shape[-1] ** 0.5)


class GptFastMoE(nn.Module):
    """gpt-fast style: softmax -> top-k -> renormalize; each token's expert weights gathered with
    w[expert_indices] and applied with einsum; separate w1 / w3 / w2."""

    def __init__(self, hidden=HIDDEN, experts=8, intermediate=32, top_k=2, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.gate.weight = _randn(experts, hidden, gen=gen)
        self.w1 = _randn(experts, intermediate, hidden, gen=gen)
        self.w3 = _randn(experts, intermediate, hidden, gen=gen)
        self.w2 = _randn(experts, hidden, intermediate, gen=gen)

    def forward(self, x):
        scores = self.scores(self.gate(x))
        expert_weights, expert_indices = torch.topk(scores, self.top_k, dim=-1)
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
        w1, w3, w2 = self.w1[expert_indices], self.w3[expert_indices], self.w2[expert_indices]
        x1 = F.silu(torch.einsum("ti,taoi->tao", x, w1))
        x3 = torch.einsum("ti,taoi->tao", x, w3)
        out = torch.einsum("tao,taio->tai", x1 * x3, w2)
        return torch.einsum("tai,ta->ti", out, expert_weights)

    def scores(self, logits):
        return F.softmax(logits, dim=-1)


class DeepSeekStyleMoE(nn.Module):
    """A DeepSeek-V3-style layer written by hand: nn.RMSNorm in front, sigmoid scores with a
    correction bias (routing in fp32), group-limited top-k (group score = max), renormalize, scale, separate
    w1 / w3 / w2 expert weights run through torch._grouped_mm over tokens sorted by expert,
    and a shared expert."""

    def __init__(self, hidden=HIDDEN, experts=16, intermediate=32, top_k=4, n_group=4, topk_group=2,
                 scale=1.5, seed=0, grouped_mm=True):
        super().__init__()
        self.grouped_mm = grouped_mm
        gen = torch.Generator().manual_seed(seed)
        self.top_k, self.n_group, self.topk_group, self.scale = top_k, n_group, topk_group, scale
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=gen))
        self.router = _randn(experts, hidden, gen=gen)
        self.bias = nn.Parameter(0.1 * torch.randn(experts, generator=gen))
        self.w1 = _randn(experts, intermediate, hidden, gen=gen)
        self.w3 = _randn(experts, intermediate, hidden, gen=gen)
        self.w2 = _randn(experts, hidden, intermediate, gen=gen)
        self.shared_w1 = _randn(intermediate, hidden, gen=gen)
        self.shared_w3 = _randn(intermediate, hidden, gen=gen)
        self.shared_w2 = _randn(hidden, intermediate, gen=gen)

    def forward(self, h):
        x = self.norm(h)
        scores = torch.sigmoid(F.linear(x.float(), self.router.float()))  # fp32 routing, as DeepSeek does
        choice = scores + self.bias
        M, E = choice.shape
        groups = choice.view(M, self.n_group, E // self.n_group).amax(dim=-1)
        dropped = torch.ones_like(groups, dtype=torch.bool).scatter(1, groups.topk(self.topk_group, dim=-1).indices, False)
        choice = choice.masked_fill(dropped.unsqueeze(-1).expand(M, self.n_group, E // self.n_group).reshape(M, E),
                                    float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.scale

        routed = self._grouped(x, ids, weights) if self.grouped_mm else self._gathered(x, ids, weights)
        shared = (F.silu(x @ self.shared_w1.t()) * (x @ self.shared_w3.t())) @ self.shared_w2.t()
        return routed + shared


    def _grouped(self, x, ids, weights):
        """Tokens sorted by expert, one torch._grouped_mm per projection (bf16 only)."""
        M, E = x.shape[0], self.w1.shape[0]
        flat = ids.flatten()
        order = flat.argsort()
        counts = torch.histc(flat.float(), bins=E, min=0, max=E - 1)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[order // self.top_k]
        gate = torch._grouped_mm(xs, self.w1.transpose(1, 2), offs=offsets)
        up = torch._grouped_mm(xs, self.w3.transpose(1, 2), offs=offsets)
        ys = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)
        out = torch.zeros(M * self.top_k, x.shape[-1], dtype=ys.dtype, device=ys.device)
        out[order] = ys
        return (out.view(M, self.top_k, -1) * weights.unsqueeze(-1).to(ys.dtype)).sum(dim=1)

    def _gathered(self, x, ids, weights):
        """Each token's expert matrices gathered by id and applied with einsum (any dtype)."""
        h = F.silu(torch.einsum("ti,tkoi->tko", x, self.w1[ids])) * torch.einsum("ti,tkoi->tko", x, self.w3[ids])
        out = torch.einsum("tko,tkio->tki", h, self.w2[ids])
        return torch.einsum("tki,tk->ti", out, weights.to(out.dtype))


class TwoKindsMoE(nn.Module):
    """Two MoE layers of different kinds in one model: grouped sigmoid top-k, then softmax top-k."""

    def __init__(self):
        super().__init__()
        self.first = DeepSeekStyleMoE(seed=1, grouped_mm=False)
        self.second = GptFastMoE(seed=2)

    def forward(self, h):
        h = h + self.first(h)
        return h + self.second(h)


class DenseMLP(nn.Module):
    """A gated-SiLU MLP with no routing: nothing to match."""

    def __init__(self, hidden=HIDDEN, intermediate=96, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1, self.w3 = _randn(intermediate, hidden, gen=gen), _randn(intermediate, hidden, gen=gen)
        self.w2 = _randn(hidden, intermediate, gen=gen)

    def forward(self, x):
        return (F.silu(x @ self.w1.t()) * (x @ self.w3.t())) @ self.w2.t()


class TopkSampler(nn.Module):
    """A top-k that is not routing: logits -> top-k -> softmax -> weighted sum of embeddings."""

    def __init__(self, hidden=HIDDEN, vocab=128, k=4, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.k = k
        self.lm_head = _randn(vocab, hidden, gen=gen)
        self.embed = _randn(vocab, hidden, gen=gen)

    def forward(self, x):
        values, idx = (x @ self.lm_head.t()).topk(self.k, dim=-1)
        probs = torch.softmax(values, dim=-1)
        return (self.embed[idx] * probs.unsqueeze(-1)).sum(dim=1)


EXAMPLES = {
    "gpt_fast": GptFastMoE,
    "deepseek_style": DeepSeekStyleMoE,
    "two_kinds": TwoKindsMoE,
    "dense_mlp": DenseMLP,
    "topk_sampler": TopkSampler,
}

# MoE layers each example has (what inspect --expect should see matched).
EXPECTED_LAYERS = {"gpt_fast": 1, "deepseek_style": 1, "two_kinds": 2, "dense_mlp": 0, "topk_sampler": 0}


# torch._grouped_mm takes bf16 only.
DEFAULT_DTYPES = {"deepseek_style": torch.bfloat16}


def build(name: str, dtype: torch.dtype = None) -> nn.Module:
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; known: {', '.join(EXAMPLES)}")
    return EXAMPLES[name]().to(dtype or DEFAULT_DTYPES.get(name, torch.float32)).eval()
