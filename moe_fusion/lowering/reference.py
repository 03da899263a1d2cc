"""Reference semantics of a MoESpec, in plain PyTorch.

This module *defines* what every moe_fusion op computes: the Triton kernels, the CPU path
and the tests all answer to it. It is written for clarity and for being safe inside CUDA
graphs (no host synchronisation: no ``nonzero``, no ``.item()``, static shapes), not for speed.

Precision follows the models it stands for: the RMSNorm statistic in fp32, the router in
fp32 or the model dtype as the spec says (fp32 accumulation), scoring and routing weights in
fp32, expert GEMMs in the model dtype (fp32 accumulation) with the top-k sum in fp32 and one
final cast. For a high-precision reference, call it on float64 copies of the tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..spec import FP8_BLOCK, FP8_DTYPE, FP8_MAX, MoESpec, MoEWeights

# Smallest scale allowed for a quantisation group, so an all-zero group quantises to zeros
# instead of NaN (the same floor vLLM and SGLang use).
FP8_MIN_SCALE = 1e-10


# --------------------------------------------------------------------------- preamble
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF-style RMSNorm: statistic in fp32, normalised value cast back, then scaled."""
    x32 = x.float() if x.dtype != torch.float64 else x
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def router_logits(spec: MoESpec, x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Router GEMM; logits are returned in fp32 (float64 for float64 inputs)."""
    score_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if spec.router_fp32:
        return F.linear(x.to(score_dtype), router_weight.to(score_dtype))
    return F.linear(x, router_weight.to(x.dtype)).to(score_dtype)


def _score(scoring: str, logits: torch.Tensor) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def _group_limited(spec: MoESpec, choice: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) every expert outside the topk_group best groups."""
    M = choice.shape[0]
    grouped = choice.view(M, spec.n_group, spec.experts_per_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    kept = group_scores.topk(spec.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    keep = keep.unsqueeze(-1).expand(M, spec.n_group, spec.experts_per_group).reshape(M, spec.num_experts)
    return choice.masked_fill(~keep, float("-inf"))


def select_experts(
    spec: MoESpec, logits: torch.Tensor, correction_bias: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scoring, (grouped) top-k, renormalisation and scaling.

    Returns top-k expert ids (int32, global numbering) and routing weights (fp32, or float64
    for float64 logits), both [M, top_k].
    """
    if spec.score_before_topk:
        scores = _score(spec.scoring, logits)
        choice = scores if correction_bias is None else scores + correction_bias.to(scores.dtype)
        if spec.grouped:
            choice = _group_limited(spec, choice)
        ids = choice.topk(spec.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
    else:
        ids = logits.topk(spec.top_k, dim=-1).indices
        weights = _score(spec.scoring, logits.gather(1, ids))
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renormalize_eps)
    weights = weights * spec.routed_scaling_factor
    return ids.to(torch.int32), weights


# --------------------------------------------------------------------------- fp8 emulation
def quantize_fp8_groups(x: torch.Tensor, group: int = FP8_BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group e4m3 quantisation: x [M, K] -> (q [M, K] fp8, scale [M, ceil(K/group)] fp32).

    scale = max(amax(|group|), FP8_MIN_SCALE * FP8_MAX) / FP8_MAX; q = round_to_e4m3(x / scale).
    """
    M, K = x.shape
    groups = -(-K // group)
    padded = F.pad(x.float(), (0, groups * group - K)).view(M, groups, group)
    scale = (padded.abs().amax(dim=-1) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (padded / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(M, groups * group)[:, :K].contiguous(), scale


def dequantize_fp8_groups(q: torch.Tensor, scale: torch.Tensor, group: int = FP8_BLOCK) -> torch.Tensor:
    expanded = scale.repeat_interleave(group, dim=-1)[..., : q.shape[-1]]
    return q.float() * expanded


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 weight quantisation: w [..., N, K] -> (q fp8, scale [..., ceil(N/b), ceil(K/b)] fp32)."""
    *lead, N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = F.pad(w.float(), (0, kb * block - K, 0, nb * block - N))
    blocks = padded.view(*lead, nb, block, kb, block)
    scale = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, nb * block, kb * block)[..., :N, :K].contiguous(), scale


def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    N, K = q.shape[-2:]
    expanded = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return q.float() * expanded[..., :N, :K]


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """What an fp8 expert kernel sees of an activation: quantised per 1x128 group, dequantised (fp32)."""
    return dequantize_fp8_groups(*quantize_fp8_groups(x))


# --------------------------------------------------------------------------- experts
def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SiLU(x Wg^T) * (x Wu^T) @ Wd^T in x's dtype."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _expert_weights(spec: MoESpec, w: MoEWeights, e: int, dtype: torch.dtype):
    if spec.fp8:
        return tuple(
            dequantize_fp8_blocks(q[e], s[e])
            for q, s in ((w.w_gate, w.w_gate_scale), (w.w_up, w.w_up_scale), (w.w_down, w.w_down_scale))
        )
    return w.w_gate[e].to(dtype), w.w_up[e].to(dtype), w.w_down[e].to(dtype)


def _fp8_gated_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """The fp8 expert: fp8 activations x fp8 weights with fp32 accumulation; the SiLU*up
    product is rounded to the model dtype before it is quantised again (as the kernels do)."""
    xq = fp8_round_trip(x).to(wg.dtype)  # dequantised weights may be float64 (a float64 reference)
    h = (F.silu(xq @ wg.T) * (xq @ wu.T)).to(x.dtype)
    return fp8_round_trip(h).to(wd.dtype) @ wd.T


def local_expert_ids(spec: MoESpec, topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor]) -> torch.Tensor:
    """Global ids -> local ids (int64), -1 where the expert lives on another rank."""
    ids = topk_ids.long()
    return ids if expert_map is None else expert_map.long()[ids]


def with_fp8_experts(spec: MoESpec, w: MoEWeights, quantize=None) -> Tuple[MoESpec, MoEWeights]:
    """quant fp8_block_quantize -> the fp8_block layer it means: the same weights with w_gate,
    w_up and w_down block-quantised (``quantize``: a function of the three weights returning
    (q_gate, q_up, q_down, s_gate, s_up, s_down); quantize_fp8_blocks by default). Other specs
    are returned as they are."""
    if not spec.quantizes_experts:
        return spec, w
    if quantize is None:
        (qg, sg), (qu, su), (qd, sd) = (quantize_fp8_blocks(t) for t in (w.w_gate, w.w_up, w.w_down))
    else:
        qg, qu, qd, sg, su, sd = quantize(w.w_gate, w.w_up, w.w_down)
    quantized = MoEWeights(**{f: getattr(w, f) for f in w.__dataclass_fields__})
    quantized.w_gate, quantized.w_up, quantized.w_down = qg, qu, qd
    quantized.w_gate_scale, quantized.w_up_scale, quantized.w_down_scale = sg, su, sd
    return spec.as_run(), quantized


def routed_experts(
    spec: MoESpec, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w: MoEWeights
) -> torch.Tensor:
    """Sum over the top-k of routing weight x expert(x), experts of this rank only.

    Every local expert runs on every token and unselected rows are dropped with ``where``
    (not multiplied by zero, so an Inf in an unselected row cannot turn into NaN); this keeps
    the reference free of data-dependent shapes and host synchronisation.
    """
    spec, w = with_fp8_experts(spec, w)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    local = local_expert_ids(spec, topk_ids, w.expert_map)
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    for e in range(spec.num_local_experts):
        wg, wu, wd = _expert_weights(spec, w, e, x.dtype)
        hit = local == e  # [M, k]
        pair_weight = torch.where(hit, topk_weights.to(acc_dtype), 0).sum(-1, keepdim=True)
        selected = hit.any(-1, keepdim=True)
        if spec.weight_on == "input":
            # Each (token, k) pair feeds its own scaled input; with top_k > 1 an expert picked
            # twice is not possible (top-k ids are distinct), so one row per token suffices.
            y = _run_expert(spec, (x.to(acc_dtype) * pair_weight).to(x.dtype), wg, wu, wd).to(acc_dtype)
        else:
            y = _run_expert(spec, x, wg, wu, wd).to(acc_dtype) * pair_weight
        out = out + torch.where(selected, y, 0)
    return out


def _run_expert(spec: MoESpec, x, wg, wu, wd) -> torch.Tensor:
    return _fp8_gated_mlp(x, wg, wu, wd) if spec.fp8 else gated_mlp(x, wg, wu, wd)


def shared_experts(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    y = gated_mlp(x, w.shared_gate.to(x.dtype), w.shared_up.to(x.dtype), w.shared_down.to(x.dtype))
    if spec.shared_gate:
        y = torch.sigmoid(F.linear(x, w.shared_expert_gate.to(x.dtype))) * y
    return y


def shared_experts_fp8(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    """The shared experts as the layer's "fused" strategy computes them next to fp8 routed experts:
    the shared MLP (width n*I) as n experts of width I, each block-quantised like a routed expert
    and run as one (_fp8_gated_mlp), summed, then gated as in shared_experts. fp32 (float64 in)."""
    I = spec.intermediate_size
    y = 0
    for s in range(spec.shared_intermediate_size // I):
        rows = slice(s * I, (s + 1) * I)
        wg, wu, wd = (dequantize_fp8_blocks(*quantize_fp8_blocks(t))
                      for t in (w.shared_gate[rows], w.shared_up[rows], w.shared_down[:, rows]))
        y = y + _fp8_gated_mlp(x, wg, wu, wd)
    if spec.shared_gate:
        y = torch.sigmoid(F.linear(x, w.shared_expert_gate.to(x.dtype))).to(y.dtype) * y
    return y


# --------------------------------------------------------------------------- whole layer
def moe_preamble(spec: MoESpec, x: torch.Tensor, w: MoEWeights):
    """RMSNorm (if any) and routing: returns (normed x, topk_ids int32, topk_weights fp32)."""
    normed = rms_norm(x, w.norm_weight, spec.rms_norm_eps) if spec.rms_norm else x
    logits = router_logits(spec, normed, w.router_weight)
    ids, weights = select_experts(spec, logits, w.correction_bias if spec.correction_bias else None)
    return normed, ids, weights


def preamble_outputs(spec: MoESpec, x: torch.Tensor, w: MoEWeights):
    """What the moe_preamble op returns: (normed, x_fp8, x_scale, topk_ids, topk_weights fp32);
    x_fp8 and x_scale are empty unless the experts are fp8."""
    normed, ids, weights = moe_preamble(spec, x, w)
    if spec.fp8:
        x_fp8, x_scale = quantize_fp8_groups(normed)
    else:
        x_fp8 = x.new_empty((0,), dtype=FP8_DTYPE)
        x_scale = x.new_empty((0,), dtype=torch.float32)
    return normed, x_fp8, x_scale, ids, weights.float()


def moe_layer(spec: MoESpec, x: torch.Tensor, w: MoEWeights, shared_fp8: bool = False) -> torch.Tensor:
    """The whole MoE layer on x [M, H]: preamble, routed experts, shared experts; output [M, H] in x's dtype.

    With expert parallelism the routed part covers local experts only; shared experts are
    computed on every rank, so callers summing ranks' outputs count them once per rank.
    shared_fp8: the shared experts as shared_experts_fp8 (the lowering's fp8 shared expert).
    """
    normed, ids, weights = moe_preamble(spec, x, w)
    out = routed_experts(spec, normed, ids, weights, w)
    if spec.has_shared_experts:
        out = out + (shared_experts_fp8 if shared_fp8 else shared_experts)(spec, normed, w).to(out.dtype)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- alignment
def max_aligned_tiles(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """Static bound on the expert GEMM's (expert, token-tile) blocks: each active expert wastes
    at most one partial tile, and at most min(pairs, experts) experts are active."""
    return -(-num_pairs // block_m) + min(num_pairs, num_local_experts)


def align_pairs(
    topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor], num_local_experts: int, block_m: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token-expert pairs by local expert, each expert's run padded to ``block_m``.

    Pair p = token * top_k + slot. Returns, all int32 and statically sized (CUDA-graph safe):
      sorted_pair_ids [max_tiles * block_m]: pair ids, expert by expert, ascending within an
          expert; padding slots hold num_pairs (one past the last pair);
      tile_expert [max_tiles]: local expert of each tile, -1 past the valid tiles;
      num_tiles [1]: number of valid tiles (they come first).
    Pairs whose expert is not local (expert_map -1) appear nowhere.
    """
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    L = num_local_experts
    max_tiles = max_aligned_tiles(num_pairs, L, block_m)
    local = topk_ids.long().flatten()
    if expert_map is not None:
        local = expert_map.long()[local]
    key = torch.where(local >= 0, local, L)  # non-local pairs sort last, into a dropped bucket
    counts = torch.zeros(L + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))[:L]
    tiles_per_expert = (counts + block_m - 1) // block_m
    padded_start = torch.cumsum(tiles_per_expert * block_m, 0) - tiles_per_expert * block_m
    pair_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    is_local = sorted_key < L
    safe_key = sorted_key.clamp(max=L - 1)
    rank = torch.arange(num_pairs, device=device) - pair_start[safe_key]
    dropped_slot = max_tiles * block_m  # one extra slot that is cut off below
    dest = torch.where(is_local, padded_start[safe_key] + rank, dropped_slot)
    sorted_pair_ids = torch.full((max_tiles * block_m + 1,), num_pairs, dtype=torch.long, device=device)
    sorted_pair_ids.scatter_(0, dest, order)
    tile_end = torch.cumsum(tiles_per_expert, 0)
    tiles = torch.arange(max_tiles, device=device)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True)
    num_tiles = tile_end[-1:]
    tile_expert = torch.where(tiles < num_tiles, tile_expert, -1)
    return sorted_pair_ids[:-1].to(torch.int32), tile_expert.to(torch.int32), num_tiles.to(torch.int32)
