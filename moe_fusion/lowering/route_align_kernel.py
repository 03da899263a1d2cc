"""Routing and alignment in one program, for the fewest tokens: the router logits [M, E] ->
topk ids and weights, then the aligned pair list, in one launch instead of the routing kernel's
and the alignment kernel's.

At decode batch 1 both kernels are a dependent chain of tiny steps (8 picks; one selection row),
so each launch costs mostly its start and its wait for the one before it; one program does both.
When its rows fit one routing tile it aligns from the ids still in registers; otherwise it reads
its own ids back after a barrier (global writes of one program are visible to its own threads
after it). Above a few tokens the row-parallel routing kernel is faster, since one program
routes rows one after another (ROUTE_ALIGN_MAX_TILE).
Reference: reference.select_experts, then reference.align_pairs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..spec import MoESpec
from . import align_kernel, topk_kernel
from .align_kernel import align_pairs_cta, align_selection, selection_of_local_ids
from .grid_sync import pdl_launch
from .topk_kernel import load_route_bias, route_columns, route_rows

# Warps of the one program (the alignment works on the ids in registers where the rows fit one tile):
# H100, session 9, dsv3 preamble at M = 1 on 4 / 2 / 1 warps 8.9 / 10.1 / 11.9 us, dsv3-ep8 8.7 / 8.8 /
# 8.7; session 13, 4 / 8 / 16 warps 8.7 / 8.9 / 29.6 us.
ROUTE_ALIGN_WARPS = 4
# The planner picks this program while tokens x padded experts stay within this tile, and the program
# then routes all its rows as one tile. H100, session 6, the preamble at M = 1 / 2 / 4, µs, two
# launches against one program (which then routed 256-column tiles in turn): mixtral (8 experts)
# 5.05 / 5.10 / 5.11 against 4.16 / 4.54 / 4.77; qwen3 (128) 6.54 / 7.38 / 7.73 against 6.61 / 6.94 /
# 9.29; dsv3 (256) 8.48 / 8.99 against 8.43 / 11.81; dsv3-ep8 M = 1 8.59 against 8.32. Session 14,
# dsv3 rows as one tile of up to 4096 (16 rows) on 4 / 8 warps against the routing and alignment
# kernels: M = 2 8.8 / 8.7 against 9.6, M = 4 11.0 / 9.9 against 9.9, M = 16 36.3 / 19.0 against 12.6;
# with the routing kernel on 4 warps (ROUTE_WARPS) a 512 tile gains only 0.2 us at M = 2 (9.1 -> 8.9),
# unmeasured for the other shapes, so the tile stays.
ROUTE_ALIGN_MAX_TILE = 256


@triton.jit
def _route_align_kernel(
    logits_ptr, stride_lm, bias_ptr, ids_ptr, weights_ptr, stride_om, M, renorm_eps, routed_scale,
    map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, L, block_m, max_tiles,
    ROWS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr, EPG: tl.constexpr,
    EPG_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, SCORE_BEFORE_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_MAX: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr, SORT_PICKS: tl.constexpr,
    TOKENS: tl.constexpr, L_PAD: tl.constexpr, HAS_MAP: tl.constexpr, ONE_CHUNK: tl.constexpr,
    ONE_TILE: tl.constexpr, PDL: tl.constexpr,
):
    """ONE_TILE (M <= ROWS): the alignment takes the ids from the routing's registers, local ids
    through the expert map read before the wait, so no memory round trip follows the picks.
    Otherwise the rows are routed tile after tile and their ids read back."""
    bias = load_route_bias(bias_ptr, HAS_BIAS, N_GROUP, G_PAD, EPG, EPG_PAD)
    if ONE_TILE and HAS_MAP:
        expert, col_ok = route_columns(N_GROUP, G_PAD, EPG, EPG_PAD)
        local_of_column = tl.load(map_ptr + expert, mask=col_ok, other=-1)
    if PDL:  # a programmatic dependent launch of the router GEMM
        tl.extra.cuda.gdc_wait()
    if ONE_TILE:
        ids = route_rows(
            logits_ptr, stride_lm, bias, ids_ptr, weights_ptr, stride_om, 0, M, renorm_eps, routed_scale,
            ROWS, N_GROUP, G_PAD, EPG, EPG_PAD, TOP_K, K_PAD, TOPK_GROUP, SCORING, SCORE_BEFORE_TOPK, HAS_BIAS,
            GROUP_MAX, RENORMALIZE, ROUND_TO, SORT_PICKS, False,
        )
        if HAS_MAP:  # local_of_column at each id: a one-hot max over the columns
            hit = expert[:, None, :] == ids[:, :, None]
            local = tl.max(tl.where(hit, local_of_column[:, None, :], -1), axis=2)
        else:
            local = ids
        real = (tl.arange(0, ROWS) < M)[:, None] & (tl.arange(0, K_PAD) < TOP_K)[None, :]
        slot = selection_of_local_ids(tl.where(real, local, -1), K_PAD, L_PAD)
        align_selection(slot, M, L, block_m, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr, ROWS, L_PAD,
                        TOP_K)
    else:
        for row0 in range(0, M, ROWS):
            route_rows(
                logits_ptr, stride_lm, bias, ids_ptr, weights_ptr, stride_om, row0, M, renorm_eps, routed_scale,
                ROWS, N_GROUP, G_PAD, EPG, EPG_PAD, TOP_K, K_PAD, TOPK_GROUP, SCORING, SCORE_BEFORE_TOPK,
                HAS_BIAS, GROUP_MAX, RENORMALIZE, ROUND_TO, SORT_PICKS, False,
            )
        tl.debug_barrier()  # every thread's ids are stored before any thread reads them back
        align_pairs_cta(ids_ptr, stride_om, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m,
                        max_tiles, TOKENS, L_PAD, TOP_K, HAS_MAP, ONE_CHUNK)


def route_and_align(spec: MoESpec, logits: torch.Tensor, correction_bias: torch.Tensor, model_dtype: torch.dtype,
                    ids: torch.Tensor, weights: torch.Tensor, expert_map: Optional[torch.Tensor], block_m: int,
                    pdl: bool = False):
    """topk_kernel.select_experts into ``ids``/``weights``, then align_kernel.align_pairs, as one
    program; returns the alignment (sorted pair ids, tile expert, number of tiles)."""
    M, L = logits.shape[0], spec.num_local_experts
    sorted_ids, tile_expert, num_tiles = align_kernel.alloc_align_outputs(M, spec.top_k, L, block_m, logits.device)
    route = topk_kernel.route_meta(spec, model_dtype, M, ROUTE_ALIGN_MAX_TILE)
    align = align_kernel.align_meta_after_routing(L, spec.top_k, expert_map, M)
    _route_align_kernel[(1,)](
        logits, logits.stride(0), correction_bias, ids, weights, ids.stride(0), M, spec.renormalize_eps,
        spec.routed_scaling_factor, ids if expert_map is None else expert_map, sorted_ids, tile_expert, num_tiles,
        L, block_m, tile_expert.numel(), **route, **align, ONE_TILE=M <= route["ROWS"],
        SORT_PICKS=topk_kernel.picks_by_sort(ROUTE_ALIGN_WARPS), PDL=pdl,
        num_warps=ROUTE_ALIGN_WARPS,
        **pdl_launch(pdl),
    )
    return sorted_ids, tile_expert, num_tiles
