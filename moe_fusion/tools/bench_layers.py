"""The MoE layers ``moe-fusion bench`` times, as plain PyTorch model code, and its named shapes.

The eager and Inductor baselines run these modules. They are written the way model code is
written (HF transformers' DeepseekV3MoE / Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock with the
"grouped_mm" experts implementation: pairs sorted by expert, histc/cumsum offsets, one
``torch._grouped_mm`` per projection), not like the dense test reference, which runs every expert
on every token. They compute what ``lowering/reference.py`` defines for the same MoESpec, and
``canonical_weights`` hands the moe_fusion ops views of the very same tensors, so the baselines
and moe_fusion share one copy of the weights.

fp8 experts (128x128 blocks, fp32 scales): plain PyTorch has no block-scaled grouped GEMM, so the
baseline dequantizes to the model dtype and runs the bf16 grouped GEMM. Only the experts the
batch hits are dequantized: a static number of slots, min(token-expert pairs, experts), hit
experts first, so there is no host synchronisation and the layer stays CUDA-graph safe. Its
activations stay in the model dtype (no 1x128 activation quantisation), so it differs from the
fp8 reference by that rounding.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..lowering import reference
from ..spec import FP8_BLOCK, FP8_DTYPE, MoESpec, MoEWeights

_DSV3 = MoESpec(
    hidden_size=7168, num_experts=256, top_k=8, intermediate_size=2048, rms_norm=True, router_fp32=True,
    scoring="sigmoid", correction_bias=True, n_group=8, topk_group=4, renormalize=True, renormalize_eps=1e-20,
    routed_scaling_factor=2.5, shared_intermediate_size=2048, dtype="bfloat16",
)
_TINY = MoESpec(
    hidden_size=256, num_experts=16, top_k=4, intermediate_size=128, rms_norm=True, router_fp32=True,
    scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, renormalize=True, renormalize_eps=1e-20,
    routed_scaling_factor=2.5, shared_intermediate_size=128, dtype="bfloat16",
)

# DESIGN.md "Measuring"; tiny / tiny-ep are DeepSeek-V3-like smoke shapes for CPU runs and tests.
SHAPES = {
    "dsv3": _DSV3,
    # One rank of 8-way expert parallelism: the full router, 32 of the 256 experts local.
    "dsv3-ep8": _DSV3.replace(num_local_experts=32),
    "qwen3-30b-a3b": MoESpec(hidden_size=2048, num_experts=128, top_k=8, intermediate_size=768,
                             scoring="softmax", renormalize=True, dtype="bfloat16"),
    "mixtral": MoESpec(hidden_size=4096, num_experts=8, top_k=2, intermediate_size=14336,
                       scoring="softmax", renormalize=True, dtype="bfloat16"),
    "tiny": _TINY,
    "tiny-ep": _TINY.replace(num_local_experts=4),
}
SMOKE_SHAPES = ("tiny", "tiny-ep")


# --------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


class TopkRouter(nn.Module):
    """Scores, (group-limited) top-k, renormalisation and scaling; DeepSeek-V3 or softmax style."""

    def __init__(self, spec: MoESpec, device):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(
            torch.empty(spec.num_experts, spec.hidden_size, dtype=spec.torch_dtype, device=device), requires_grad=False)
        if spec.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts, device=device))
        else:
            self.e_score_correction_bias = None

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        if s.router_fp32:
            logits = F.linear(hidden_states.to(torch.float32), self.weight.to(torch.float32))
        else:
            logits = F.linear(hidden_states, self.weight).to(torch.float32)
        scores = torch.sigmoid(logits) if s.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if s.n_group > 1:
            tokens = choice.shape[0]
            per_group = choice.view(tokens, s.n_group, s.experts_per_group)
            group_scores = per_group.topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = group_scores.topk(s.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, s.experts_per_group).reshape(tokens, -1)
            # HF fills 0.0 here; -inf keeps the spec's meaning when a kept score is negative.
            choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
        topk_idx = choice.topk(s.top_k, dim=-1, sorted=False)[1]
        topk_weight = scores.gather(1, topk_idx)
        if s.renormalize:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + s.renormalize_eps)
        return topk_idx, topk_weight * s.routed_scaling_factor


def grouped_mm(rows: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows [S, K] (sorted by group) @ weight_t[g] [K, N] per group; rows past offsets[-1] are not written."""
    return torch._grouped_mm(rows, weight_t, offs=offsets)


def _tokens_per_expert(sorted_keys: torch.Tensor, bins: int) -> torch.Tensor:
    # histc is CUDA-graph safe (bincount is not); keys >= bins (other ranks' pairs) fall outside and are dropped.
    keys = sorted_keys.float() if sorted_keys.device.type == "cpu" else sorted_keys.int()
    return torch.histc(keys, bins=bins, min=0, max=bins - 1)


class GroupedMMExperts(nn.Module):
    """Routed experts in the model dtype: fused gate_up [E, 2I, H] and down [E, H, I], as HF stores them."""

    def __init__(self, spec: MoESpec, device):
        super().__init__()
        self.spec = spec
        E, H, I = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
        weight_dtype = FP8_DTYPE if spec.fp8 else spec.torch_dtype
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, dtype=weight_dtype, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I, dtype=weight_dtype, device=device), requires_grad=False)
        if spec.expert_parallel:
            self.register_buffer("expert_map", torch.full((spec.num_experts,), -1, dtype=torch.int32, device=device))
        else:
            self.expert_map = None

    def local_expert_of_pairs(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """Local expert of each (token, slot) pair, flattened; other ranks' pairs get E_local (they sort last)."""
        expert = topk_idx.reshape(-1).long()
        if self.expert_map is None:
            return expert
        local = self.expert_map[expert].long()
        return torch.where(local >= 0, local, self.spec.num_local_experts)

    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        keys = self.local_expert_of_pairs(topk_idx)
        return self._run_sorted(hidden_states, topk_idx.shape[1], keys, topk_weight, self.spec.num_local_experts,
                                self.gate_up_proj, self.down_proj)

    def _run_sorted(self, hidden_states, top_k, keys, topk_weight, groups, gate_up, down) -> torch.Tensor:
        """Sort the pairs by group key, two grouped GEMMs, weight, and sum each token's pairs (fp32 [M, H])."""
        tokens = hidden_states.shape[0]
        sorted_keys, order = torch.sort(keys)
        rows = hidden_states[order // top_k]
        offsets = torch.cumsum(_tokens_per_expert(sorted_keys, groups), dim=0, dtype=torch.int32)
        gate, up = grouped_mm(rows, gate_up.transpose(1, 2), offsets).chunk(2, dim=-1)
        out = grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offsets)
        out = out.to(torch.float32) * topk_weight.reshape(-1)[order].unsqueeze(-1)
        if self.expert_map is not None:
            out = out.masked_fill((sorted_keys >= groups).unsqueeze(-1), 0.0)  # unwritten rows past offsets[-1]
        per_pair = torch.empty_like(out)
        per_pair[order] = out
        return per_pair.view(tokens, top_k, -1).sum(dim=1)


class DequantGroupedMMExperts(GroupedMMExperts):
    """fp8 block-quantized experts: dequantize the experts this batch hits, then the grouped GEMMs."""

    def __init__(self, spec: MoESpec, device):
        super().__init__(spec, device)
        E, H, I = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
        if H % FP8_BLOCK or I % FP8_BLOCK:
            raise ValueError(f"the fp8 baseline needs hidden and intermediate sizes divisible by {FP8_BLOCK}, got H={H}, I={I}")
        nh, ni = H // FP8_BLOCK, I // FP8_BLOCK
        self.register_buffer("gate_up_scale", torch.ones(E, 2 * ni, nh, device=device))
        self.register_buffer("down_scale", torch.ones(E, nh, ni, device=device))

    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        E = self.spec.num_local_experts
        keys = self.local_expert_of_pairs(topk_idx)
        slots = min(keys.numel(), E)  # a static bound on the distinct experts hit
        hit = torch.zeros(E + 1, dtype=torch.int32, device=keys.device).index_fill_(0, keys, 1)[:E]
        active = torch.sort(hit, descending=True, stable=True)[1][:slots]
        slot_of = torch.full((E + 1,), slots, dtype=torch.long, device=keys.device)
        slot_of[active] = torch.arange(slots, device=keys.device)
        dtype = hidden_states.dtype
        gate_up = _dequantize(self.gate_up_proj, self.gate_up_scale, active, dtype)
        down = _dequantize(self.down_proj, self.down_scale, active, dtype)
        return self._run_sorted(hidden_states, topk_idx.shape[1], slot_of[keys], topk_weight, slots, gate_up, down)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Gathered through a uint8 view: index kernels for fp8 types are missing from some builds.
    picked = q.view(torch.uint8)[experts].view(FP8_DTYPE)
    U, N, K = picked.shape
    w = picked.to(dtype)
    # In-place multiply by the fp32 scales: the product is formed in fp32 and rounded once.
    w.view(U, N // FP8_BLOCK, FP8_BLOCK, K // FP8_BLOCK, FP8_BLOCK).mul_(scale[experts][:, :, None, :, None])
    return w


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype, device=device)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEPreamble(nn.Module):
    """Post-attention RMSNorm (where the spec has one) and the router: x -> (normed, topk_idx, topk_weight)."""

    def __init__(self, spec: MoESpec, device):
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.torch_dtype, device) if spec.rms_norm else None
        self.gate = TopkRouter(spec, device)

    def forward(self, x: torch.Tensor):
        hidden_states = x if self.norm is None else self.norm(x)
        topk_idx, topk_weight = self.gate(hidden_states)
        return hidden_states, topk_idx, topk_weight


class MoELayer(nn.Module):
    """The whole layer: preamble, routed experts, shared experts; [M, H] in, [M, H] out (x's dtype)."""

    def __init__(self, spec: MoESpec, device):
        super().__init__()
        self.spec = spec
        self.preamble = MoEPreamble(spec, device)
        self.experts = (DequantGroupedMMExperts if spec.fp8 else GroupedMMExperts)(spec, device)
        self.shared_experts = (
            GatedMLP(spec.hidden_size, spec.shared_intermediate_size, spec.torch_dtype, device)
            if spec.has_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_states, topk_idx, topk_weight = self.preamble(x)
        out = self.experts(hidden_states, topk_idx, topk_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states).to(torch.float32)
        return out.to(x.dtype)


# --------------------------------------------------------------------------- weights
def build_layer(spec: MoESpec, device, seed: int = 0) -> MoELayer:
    """A MoELayer with random weights (never zeros); fp8 experts are quantized expert by expert chunk."""
    layer = MoELayer(spec, device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        p = layer.preamble
        _fill_random(p.gate.weight, g)
        if p.norm is not None:
            p.norm.weight.copy_(1 + 0.1 * torch.randn(spec.hidden_size, generator=g, device=device))
        if p.gate.e_score_correction_bias is not None:
            p.gate.e_score_correction_bias.copy_(0.1 * torch.randn(spec.num_experts, generator=g, device=device))
        ex = layer.experts
        if spec.fp8:
            _fill_fp8(ex.gate_up_proj, ex.gate_up_scale, g)
            _fill_fp8(ex.down_proj, ex.down_scale, g)
        else:
            _fill_random(ex.gate_up_proj, g)
            _fill_random(ex.down_proj, g)
        if ex.expert_map is not None:
            # Rank 0 of a contiguous split: global experts [0, E_local) are the local ones.
            ex.expert_map[: spec.num_local_experts] = torch.arange(spec.num_local_experts, dtype=torch.int32)
        if layer.shared_experts is not None:
            for linear in (layer.shared_experts.gate_proj, layer.shared_experts.up_proj, layer.shared_experts.down_proj):
                _fill_random(linear.weight, g)
    return layer


def _fill_random(t: torch.Tensor, g: torch.Generator) -> None:
    """N(0, 1/fan_in), so activations keep unit scale through the layer."""
    t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=g)


def _fill_fp8(q: torch.Tensor, scale: torch.Tensor, g: torch.Generator, chunk_elements: int = 1 << 28) -> None:
    per_expert = q[0].numel()
    step = max(1, chunk_elements // per_expert)
    for start in range(0, q.shape[0], step):
        master = torch.empty(q[start:start + step].shape, dtype=torch.float32, device=q.device)
        _fill_random(master, g)
        q[start:start + step], scale[start:start + step] = reference.quantize_fp8_blocks(master)


def canonical_weights(layer: MoELayer, preamble: Optional[MoEPreamble] = None) -> MoEWeights:
    """Views of the layer's own tensors in MoEWeights form (no copies); ``preamble`` swaps in a copy's router."""
    spec, ex = layer.spec, layer.experts
    p = preamble if preamble is not None else layer.preamble
    I = spec.intermediate_size
    w = MoEWeights(
        router_weight=p.gate.weight, w_gate=ex.gate_up_proj[:, :I], w_up=ex.gate_up_proj[:, I:], w_down=ex.down_proj,
        norm_weight=None if p.norm is None else p.norm.weight,
        correction_bias=p.gate.e_score_correction_bias, expert_map=ex.expert_map,
    )
    if spec.fp8:
        ni = I // FP8_BLOCK
        w.w_gate_scale, w.w_up_scale, w.w_down_scale = ex.gate_up_scale[:, :ni], ex.gate_up_scale[:, ni:], ex.down_scale
    if layer.shared_experts is not None:
        s = layer.shared_experts
        w.shared_gate, w.shared_up, w.shared_down = s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight
    w.check(spec)
    return w


# --------------------------------------------------------------------------- bytes
def _gated_mlp_bytes(spec: MoESpec, inter: int, fp8: bool) -> int:
    """Bytes of one gated MLP's three matrices of width ``inter`` (with fp8 block scales)."""
    H = spec.hidden_size
    if fp8:
        blocks = 3 * (-(-H // FP8_BLOCK)) * (-(-inter // FP8_BLOCK))
        return 3 * H * inter + 4 * blocks
    return 3 * H * inter * spec.torch_dtype.itemsize


def expert_bytes(spec: MoESpec) -> int:
    """Bytes of one routed expert's weights (with its fp8 scales)."""
    return _gated_mlp_bytes(spec, spec.intermediate_size, spec.fp8)


def preamble_bytes(spec: MoESpec) -> int:
    """Router, norm and correction-bias weights."""
    elt = spec.torch_dtype.itemsize
    return spec.num_experts * spec.hidden_size * elt + spec.hidden_size * elt * spec.rms_norm + 4 * spec.num_experts * spec.correction_bias


def shared_bytes(spec: MoESpec, fp8: bool = False) -> int:
    """The shared experts' weights as the layer reads them: in the model dtype, or the
    block-quantised fp8 copies when the plan computes them in fp8 (LayerPlan.shared_fp8)."""
    return _gated_mlp_bytes(spec, spec.shared_intermediate_size, fp8)


def layer_weight_bytes(spec: MoESpec) -> int:
    return preamble_bytes(spec) + shared_bytes(spec) + spec.num_local_experts * expert_bytes(spec)
