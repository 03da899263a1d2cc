"""Routing on router logits: scoring, correction bias, group-limited top-k, renormalisation
and scaling, as ``reference.select_experts`` defines them.

``route_rows`` is a Triton helper shared by the standalone kernel here (one program per block
of rows, the general path) and by the router kernel's fused epilogue (decode path).

Logits are laid out as groups of experts-per-group columns, both padded to powers of two, so any
E = n_group * experts_per_group works. Among equal values the lower expert index wins (the tie
rule; torch does the same on the CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import MoESpec
from .grid_sync import pdl_launch

SCORING_CODES = {"softmax": 0, "sigmoid": 1, "none": 2}
# Largest routing tile one program holds in registers (rows x padded experts).
MAX_ROUTE_TILE = 4096
# The standalone kernel spreads rows over programs: a pick's reduction chain costs about the same
# for 1 row as for 16, but 16 rows cost 3.6x the time of 1 on the H100 (15.8 vs 4.4 us, dsv3, v2),
# and in v4 the general path grew 12.7 -> 17.4 us from M = 1 to 4 with 4 rows per program: one
# padded row of 256 experts per program (dsv3), more rows only for small expert counts.
ROWS_TILE = 256
# Warps of a routing program. H100 v5: one warp routed dsv3's single 256-expert rows 0.3-0.5 us faster
# than four, picking by one max per pick (no cross-warp barrier per pick); session 14, with the picks
# by sort on four warps, four were faster at every M (dsv3 preamble 9.6 / 9.9 / 12.6 / 15.5 -> 9.0 /
# 9.3 / 11.9 / 14.8 us at M = 2 / 4 / 16 / 64, in-process A/B, benchmarks/results/s14_experiments).
ROUTE_WARPS = 4
# Programs of more than one warp make the top-k picks by one bitonic top-k of the row (tl.topk)
# instead of one row-wide max per pick (picks_by_sort). H100, session 13, dsv3 at M = 1: inside
# route_align (4 warps) the routing of one row took 2.04 instead of 2.79 us
# (benchmarks/gpu_route_align_phases.py) and the preamble 7.9 instead of 8.6 us; on one warp
# the sort was slower (3.25 against 2.57 us). A pick's slot is its rank among the top K_PAD keys where
# below TOP_K: session 14 took it where a key was at least the smallest of the top TOP_K (one more
# reduction), and on the H100 grouped [16, 4] tiles on 4 warps (each element held by two threads) lost a
# pick's weight that way; with the rank alone session 15 ran the randomized routing tests on every tile
# without a failure (benchmarks/results/s15_experiments).
SORT_PICKS = True


@triton.jit
def _score(logits, valid, axis_max, SCORING: tl.constexpr):
    """sigmoid / none of ``logits``; for softmax the numerator exp(l - max), 0 where not ``valid``."""
    if SCORING == 0:
        return tl.where(valid, tl.exp(logits - axis_max), 0.0)
    elif SCORING == 1:
        return 1.0 / (1.0 + tl.exp(-logits))
    else:
        return logits


# A pick is one max over int64 keys: the fp32 value's bits made monotone as a signed int in the high
# word, the index's low 31 bits inverted in the low word, so the largest key is the largest value
# and, among equal values, the lowest index. One reduction per pick instead of a max and an argmin.
NO_KEY = tl.constexpr(-0x7FFFFFFFFFFFFFFF - 1)


@triton.jit
def _keys(values, index, valid):
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    key = (ordered.to(tl.int64) << 32) | (index ^ 0x7FFFFFFF).to(tl.int64)
    return tl.where(valid, key, NO_KEY)


@triton.jit
def _index_of(key):
    return (key & 0x7FFFFFFF).to(tl.int32) ^ 0x7FFFFFFF


@triton.jit
def route_columns(N_GROUP: tl.constexpr, G_PAD: tl.constexpr, EPG: tl.constexpr, EPG_PAD: tl.constexpr):
    """The expert id of each column of a routing row ([1, G_PAD * EPG_PAD]) and whether it is one."""
    c = tl.arange(0, G_PAD * EPG_PAD)
    g = c // EPG_PAD
    j = c % EPG_PAD
    return (g * EPG + j)[None, :], ((g < N_GROUP) & (j < EPG))[None, :]


@triton.jit
def load_route_bias(bias_ptr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                    EPG: tl.constexpr, EPG_PAD: tl.constexpr):
    """The correction bias in routing columns (0 without one). Kernels load it before they wait for
    the logits (it is a weight, not the previous kernel's output), so its latency is not in the chain."""
    expert, col_ok = route_columns(N_GROUP, G_PAD, EPG, EPG_PAD)
    if HAS_BIAS:
        return tl.load(bias_ptr + expert, mask=col_ok, other=0.0).to(tl.float32)
    return tl.zeros((1, G_PAD * EPG_PAD), tl.float32)


@triton.jit
def _picks_one_by_one(keys, ROWS: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                      E: tl.constexpr):
    """The TOP_K largest keys of each row, one max per pick: the ids [ROWS, K_PAD] in pick order (0
    past TOP_K), and the slot that picked each column [ROWS, E_PAD] (-1 for none)."""
    k = tl.arange(0, K_PAD)
    ids = tl.zeros((ROWS, K_PAD), dtype=tl.int32)
    slot_of = tl.full((ROWS, E_PAD), -1, tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(keys, axis=1)
        picked = tl.minimum(_index_of(best), E - 1)  # a row of only NaN has no key
        ids = tl.where(k[None, :] == slot, picked[:, None], ids)
        taken = keys == best[:, None]
        slot_of = tl.where(taken, slot, slot_of)
        keys = tl.where(taken, NO_KEY, keys)
    return ids, slot_of


@triton.jit
def _picks_by_sort(keys, ROWS: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                   E: tl.constexpr):
    """_picks_one_by_one's result from one bitonic top-K_PAD of each row (tl.topk): a few compare-and-
    swap rounds, each at most one exchange between threads, instead of TOP_K dependent reductions of a
    whole row. Keys are distinct (each holds its column's index), so the order is the picks' order, and
    a column's slot is the number of larger keys among the top K_PAD, chosen where below TOP_K."""
    k = tl.arange(0, K_PAD)
    top = tl.topk(keys, K_PAD, dim=1)  # [ROWS, K_PAD], descending
    ids = tl.where(k[None, :] < TOP_K, tl.minimum(_index_of(top), E - 1), 0)
    larger = tl.sum((top[:, :, None] > keys[:, None, :]).to(tl.int32), axis=1)
    return ids, tl.where(larger < TOP_K, larger, -1)


@triton.jit
def route_rows(
    logits_ptr, stride_lm, bias, ids_ptr, weights_ptr, stride_om, row0, M,
    renorm_eps, routed_scale,
    ROWS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr, EPG: tl.constexpr,
    EPG_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, SCORE_BEFORE_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_MAX: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr, SORT_PICKS: tl.constexpr,
    VOLATILE_LOGITS: tl.constexpr,
):
    """Routes rows [row0, row0 + ROWS) of the fp32 logits [M, E]; writes ids (int32) and weights (fp32).
    ``bias``: load_route_bias's tile.

    Column c of the [ROWS, G_PAD * EPG_PAD] tile is expert (c / EPG_PAD) * EPG + c % EPG_PAD (powers
    of two: shifts and masks), so groups are contiguous column ranges and a reshape gives the
    [ROWS, G_PAD, EPG_PAD] view the group scores need. The picks work on int64 keys (``_keys``),
    one max per pick along the row, or with SORT_PICKS one bitonic top-k. Returns the ids tile
    [ROWS, K_PAD].
    """
    E_PAD: tl.constexpr = G_PAD * EPG_PAD
    rows = row0 + tl.arange(0, ROWS)
    expert, col_ok = route_columns(N_GROUP, G_PAD, EPG, EPG_PAD)
    row_ok = rows < M
    logits = tl.load(logits_ptr + rows[:, None] * stride_lm + expert, mask=row_ok[:, None] & col_ok, other=0.0,
                     volatile=VOLATILE_LOGITS)
    if ROUND_TO is not None:  # a router in the model dtype rounds its output to that dtype
        logits = logits.to(ROUND_TO).to(tl.float32)
    logits = tl.where(col_ok, logits, float("-inf"))
    k = tl.arange(0, K_PAD)
    row_max = tl.max(logits, axis=1)

    if SCORE_BEFORE_TOPK:
        scores = _score(logits, col_ok, row_max[:, None], SCORING)
        if SCORING == 0:
            denom = tl.sum(scores, axis=1)
            scores = scores / denom[:, None]
        choice = scores
        if HAS_BIAS:
            choice = choice + bias
        choice = tl.where(col_ok, choice, float("-inf"))
        if N_GROUP > 1:
            choice = _keep_best_groups(choice, ROWS, N_GROUP, G_PAD, EPG_PAD, TOPK_GROUP, GROUP_MAX)
    else:
        choice = logits

    keys = _keys(choice, expert, col_ok & (rows >= 0)[:, None])
    if SORT_PICKS and K_PAD > 1:  # one pick is one max either way
        ids, slot_of = _picks_by_sort(keys, ROWS, E_PAD, TOP_K, K_PAD, N_GROUP * EPG)
    else:
        ids, slot_of = _picks_one_by_one(keys, ROWS, E_PAD, TOP_K, K_PAD, N_GROUP * EPG)

    # Weights in the columns, from the scores already in registers, then stored at their slots: no
    # second read of the chosen logits, a memory round trip at the end of the dependent chain (on the
    # H100 no change measured, on the H200 0.2-1.9 us off the layer: benchmarks/results/layer_session8.md).
    chosen = slot_of >= 0
    if SCORE_BEFORE_TOPK:
        weights = scores
    else:
        chosen_logits = tl.where(chosen, logits, float("-inf"))
        weights = _score(chosen_logits, chosen, tl.max(chosen_logits, axis=1)[:, None], SCORING)
        if SCORING == 0:
            weights = weights / tl.sum(weights, axis=1)[:, None]
    weights = tl.where(chosen, weights, 0.0)
    # torch's top-k ranks NaN above every number, so the reference picks a NaN logit's expert and
    # that row's weights go NaN; the keys order NaN by its bits (a negative NaN last), so such rows
    # are poisoned explicitly.
    row_has_nan = tl.max((logits != logits).to(tl.int32), axis=1) > 0
    weights = tl.where(row_has_nan[:, None], float("nan"), weights)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + renorm_eps)
    weights = weights * routed_scale

    out_mask = row_ok[:, None] & (k[None, :] < TOP_K)
    tl.store(ids_ptr + rows[:, None] * stride_om + k[None, :], ids, mask=out_mask)
    tl.store(weights_ptr + rows[:, None] * stride_om + slot_of, weights, mask=row_ok[:, None] & chosen)
    return ids


@triton.jit
def _best_two(best_a, second_a, best_b, second_b):
    """Combines (best, runner-up) pairs: a tied maximum counts twice, as in a sum of the top 2."""
    return tl.maximum(best_a, best_b), tl.maximum(tl.minimum(best_a, best_b), tl.maximum(second_a, second_b))


@triton.jit
def _keep_best_groups(choice, ROWS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                      EPG_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_MAX: tl.constexpr):
    """-inf for every expert outside the TOPK_GROUP best groups (group score: max, or sum of top 2)."""
    grouped = tl.reshape(choice, (ROWS, G_PAD, EPG_PAD))
    if GROUP_MAX:
        group_score = tl.max(grouped, axis=2)
    else:  # the two best in one reduction, not the best and then the best of the rest
        top1, top2 = tl.reduce((grouped, tl.full(grouped.shape, float("-inf"), tl.float32)), 2, _best_two)
        group_score = top1 + top2
    g = tl.arange(0, G_PAD)[None, :]
    group_keys = _keys(group_score, g, g < N_GROUP)
    keep = g < 0
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(group_keys, axis=1)
        keep = keep | (g == _index_of(best)[:, None])
        group_keys = tl.where(group_keys == best[:, None], NO_KEY, group_keys)
    kept = tl.where(keep[:, :, None], grouped, float("-inf"))
    return tl.reshape(kept, (ROWS, G_PAD * EPG_PAD))


@triton.jit
def _topk_kernel(
    logits_ptr, stride_lm, bias_ptr, ids_ptr, weights_ptr, stride_om, M, renorm_eps, routed_scale,
    ROWS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr, EPG: tl.constexpr,
    EPG_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, SCORE_BEFORE_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_MAX: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr, SORT_PICKS: tl.constexpr,
    PDL: tl.constexpr,
):
    bias = load_route_bias(bias_ptr, HAS_BIAS, N_GROUP, G_PAD, EPG, EPG_PAD)
    if PDL:  # a programmatic dependent launch of the router GEMM; the alignment kernel follows it
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    route_rows(
        logits_ptr, stride_lm, bias, ids_ptr, weights_ptr, stride_om, tl.program_id(0) * ROWS, M,
        renorm_eps, routed_scale, ROWS, N_GROUP, G_PAD, EPG, EPG_PAD, TOP_K, K_PAD, TOPK_GROUP, SCORING,
        SCORE_BEFORE_TOPK, HAS_BIAS, GROUP_MAX, RENORMALIZE, ROUND_TO, SORT_PICKS, False,
    )


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def route_meta(spec: MoESpec, logit_dtype: torch.dtype, M: int = 1 << 30, max_tile: int = MAX_ROUTE_TILE) -> dict:
    """Compile-time parameters of ``route_rows`` for a spec; rows per program as many as M needs,
    up to ``max_tile`` elements (rows x padded experts)."""
    g_pad = triton.next_power_of_2(spec.n_group)
    epg_pad = triton.next_power_of_2(spec.experts_per_group)
    round_to = None if spec.router_fp32 else _TL_DTYPES.get(logit_dtype)
    return dict(
        ROWS=max(1, min(16, triton.next_power_of_2(max(M, 1)), max_tile // (g_pad * epg_pad))), N_GROUP=spec.n_group, G_PAD=g_pad,
        EPG=spec.experts_per_group, EPG_PAD=epg_pad, TOP_K=spec.top_k, K_PAD=triton.next_power_of_2(spec.top_k),
        TOPK_GROUP=spec.topk_group, SCORING=SCORING_CODES[spec.scoring], SCORE_BEFORE_TOPK=spec.score_before_topk,
        HAS_BIAS=spec.correction_bias, GROUP_MAX=spec.group_score == "max", RENORMALIZE=spec.renormalize,
        ROUND_TO=round_to,
    )


def picks_by_sort(num_warps: int) -> bool:
    """route_rows' SORT_PICKS for a routing program of ``num_warps`` warps (see SORT_PICKS)."""
    return SORT_PICKS and num_warps > 1


def padded_experts(spec: MoESpec) -> int:
    """Columns of one routing row: groups and experts per group each padded to a power of two."""
    return triton.next_power_of_2(spec.n_group) * triton.next_power_of_2(spec.experts_per_group)


def route_fits(spec: MoESpec) -> bool:
    return padded_experts(spec) <= MAX_ROUTE_TILE


def select_experts(spec: MoESpec, logits: torch.Tensor, correction_bias, model_dtype: torch.dtype, ids=None,
                   weights=None, pdl: bool = False):
    """Standalone routing of fp32 logits [M, E] (one program per block of rows); ``pdl``: launched as
    a programmatic dependent of the kernel that writes the logits (CUDA only)."""
    M = logits.shape[0]
    ids = torch.empty((M, spec.top_k), dtype=torch.int32, device=logits.device) if ids is None else ids
    weights = torch.empty((M, spec.top_k), dtype=torch.float32, device=logits.device) if weights is None else weights
    meta = route_meta(spec, model_dtype, M, ROWS_TILE)
    bias = correction_bias if spec.correction_bias else logits
    _topk_kernel[(triton.cdiv(M, meta["ROWS"]),)](
        logits, logits.stride(0), bias, ids, weights, ids.stride(0), M, spec.renormalize_eps,
        spec.routed_scaling_factor, **meta, SORT_PICKS=picks_by_sort(ROUTE_WARPS), PDL=pdl, num_warps=ROUTE_WARPS,
        **pdl_launch(pdl),
    )
    return ids, weights
