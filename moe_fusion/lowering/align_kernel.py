"""Expert alignment: token-expert pairs grouped by local expert, each expert's run padded to
``block_m``, exactly the format of ``reference.align_pairs``. Two kernels: one program for few
tokens, and one program per pair of local experts for more (``_align_parallel_kernel``: each
program histograms every pair's expert to find where its experts' runs start, then ranks only
its own experts' pairs, so its cost grows with M but not with M x L).

Up to PAIR_LIST_MAX_PAIRS pairs the one program compares every pair with every other
(``align_pair_list``). Above that it works on a selection matrix [tokens, local experts] instead
of sorting: a token picks an expert at most once, so a pair's rank inside its expert is the
number of earlier tokens that picked the same expert, an exclusive prefix sum down the matrix's
column. Tokens go in chunks of ``TOKENS`` rows with a running per-expert count, so one program
handles any M (the cost is O(M * L * top_k), which is why larger M go to the many-program kernel,
and beyond ALIGN_KERNEL_MAX_M to the reference); up to ``TOKENS`` tokens the matrix is built once.
Padding slots are written directly (they are known from the counts alone), not filled first and
overwritten after a barrier.

``align_pairs_cta`` is a Triton helper shared by the standalone kernel here and the router
kernel's fused epilogue; it reads topk_ids from memory, so the caller must put a barrier
between writing them and calling it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from .grid_sync import pdl_launch

MAX_SELECTION_TILE = 4096  # tokens x padded local experts held in registers at once
FILL_BLOCK = tl.constexpr(1024)
# Warps of the one-program alignment, up to 16 tokens and above (H100 v5, dsv3 preamble: 8 warps
# 10.6 / 14.8 us at M = 4 / 16 against 4 warps' 11.0 / 15.4; 16 warps 24.8 us at M = 64 against 26.6).
ALIGN_NUM_WARPS, ALIGN_NUM_WARPS_ABOVE_16 = 8, 16
# The many-program alignment (_align_parallel_kernel) from PARALLEL_MIN_M tokens and PARALLEL_MIN_L
# local experts (H100, alignment alone, session 5: dsv3 M = 16 / 64 / 256 3.4 / 3.8 / 6.6 us against
# the one program's 4.9 / 13.4 / 39.7; dsv3-ep8 2.5 / 3.0 / 5.4 against 2.8 / 4.7 / 13.0; below 16
# tokens the one program was as fast or faster), with 2 experts per program (4 or 8: slower) and
# 8 warps, pairs in steps of up to PARALLEL_PAIRS (4096 against 1024: dsv3 M = 1024 / 4096 15.5 /
# 54.9 against 19.3 / 70.9 us, the same at M <= 256).
PARALLEL_MIN_M = 16
PARALLEL_MIN_L = 32
# Beyond this many tokens the many-program kernel whatever L: the one program was never planned
# above it (its cost is O(M * L * top_k)), the many-program kernel was measured to 16384.
ONE_PROGRAM_MAX_M = 1024
PARALLEL_EXPERTS = 2
PARALLEL_PAIRS = 4096
PARALLEL_WARPS = 8
# The one program aligns from the pair list (align_pair_list: [pairs, pairs] comparisons) up to this
# many pairs, from the [tokens, experts] selection above. H100, session 16, preamble in-process A/B
# (router weights from HBM), selection against pair list, µs: dsv3 M = 2 / 4 / 8 9.5 / 9.6 / 11.3 against
# 9.1 / 9.1 / 11.5, qwen3 M = 4 / 8 7.6 / 8.7 against 7.2 / 9.4: at 64 pairs the [64, 64] tiles take 143
# registers (sm_90 compile) and lose. In route_align's one tile the pair list lost too (dsv3-ep8 M = 1
# 8.1 against 8.4) and, fed by a reshape of the [rows, top-k] ids, gave wrong pair ids on the GPU where
# the tile had several rows: s16_experiments/route_align_pair_list.patch.
PAIR_LIST_MAX_PAIRS = 32
PAIR_LIST_WARPS = 4
# Above this many tokens torch's sort-based alignment is faster (H100, session 5, alignment alone,
# dsv3: many-program kernel 54.9 / 213 us against torch's 144 / 171 at M = 4096 / 16384).
ALIGN_KERNEL_MAX_M = 4096


@triton.jit
def _selection(ids_ptr, stride_im, map_ptr, t0, M, TOKENS: tl.constexpr, L_PAD: tl.constexpr,
               TOP_K: tl.constexpr, HAS_MAP: tl.constexpr):
    """Slot (0..top_k-1) through which token t picked local expert e, or -1: [TOKENS, L_PAD] int32."""
    t = t0 + tl.arange(0, TOKENS)
    e = tl.arange(0, L_PAD)
    slot = tl.full((TOKENS, L_PAD), -1, tl.int32)
    for k in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * stride_im + k, mask=t < M, other=-1).to(tl.int32)
        if HAS_MAP:
            expert = tl.load(map_ptr + expert, mask=expert >= 0, other=-1)
        slot = tl.where(e[None, :] == expert[:, None], k, slot)
    return slot


@triton.jit
def _tiles_and_padding(counts, e, mine, M, block_m, num_pairs, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr,
                       program, programs):
    """Everything but the pairs themselves, from the pair count of every expert (``counts`` over
    experts ``e`` in ascending order): see _store_tiles_and_padding. Returns each expert's first slot."""
    tiles = (counts + block_m - 1) // block_m
    tile_start = tl.cumsum(tiles, axis=0) - tiles
    return _store_tiles_and_padding(counts, tiles, tile_start, tl.sum(tiles, axis=0), e, mine, M, block_m, num_pairs,
                                    max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr, program, programs)


@triton.jit
def _store_tiles_and_padding(counts, tiles, tile_start, num_tiles, e, mine, M, block_m, num_pairs, max_tiles,
                             sorted_ptr, tile_expert_ptr, num_tiles_ptr, program, programs):
    """num_tiles (program 0), each tile's expert and the padding after each expert's pairs for the
    experts ``e`` where ``mine`` (``counts`` pairs in ``tiles`` tiles from tile ``tile_start``), and
    this program's strided share of the unused tail. These slots never hold a pair, so the pairs can
    be stored before or after without a barrier. Returns each expert's first slot."""
    pair_start = tile_start * block_m
    if program == 0:
        tl.store(num_tiles_ptr, num_tiles)
    for j in range(0, (M + block_m - 1) // block_m):  # an expert has at most M pairs
        tl.store(tile_expert_ptr + tile_start + j, e, mask=mine & (j < tiles))
    padding = tl.zeros_like(counts) + num_pairs
    for j in range(0, block_m):  # an expert's last tile has fewer than block_m empty slots
        tl.store(sorted_ptr + pair_start + counts + j, padding, mask=mine & (counts + j < tiles * block_m))
    f = tl.arange(0, FILL_BLOCK)
    step = programs * FILL_BLOCK
    for s0 in range(num_tiles * block_m + program * FILL_BLOCK, max_tiles * block_m, step):
        tl.store(sorted_ptr + s0 + f, tl.full((FILL_BLOCK,), 0, tl.int32) + num_pairs, mask=s0 + f < max_tiles * block_m)
    for s0 in range(num_tiles + program * FILL_BLOCK, max_tiles, step):
        tl.store(tile_expert_ptr + s0 + f, tl.full((FILL_BLOCK,), -1, tl.int32), mask=s0 + f < max_tiles)
    return pair_start


@triton.jit
def align_pair_list(local, M, num_pairs, block_m, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr):
    """The whole alignment from the pairs themselves: ``local`` [P] the local expert of pair p (-1: not
    local, or p >= ``num_pairs`` = M * top_k). Works on [P, P] comparisons instead of a [tokens, experts]
    selection: for a few pairs that is far less work than the experts' scans. A pair's rank is the
    number of earlier pairs of its expert; an expert's tiles start after the tiles of the smaller
    experts, each counted once, at its first pair."""
    pair = tl.arange(0, local.shape[0])
    valid = local >= 0
    same = (local[None, :] == local[:, None]) & valid[:, None]
    counts = tl.sum(same.to(tl.int32), axis=1)
    rank = tl.sum((same & (pair[None, :] < pair[:, None])).to(tl.int32), axis=1)
    first = valid & (rank == 0)
    tiles = tl.where(first, (counts + block_m - 1) // block_m, 0)
    smaller = (local[None, :] < local[:, None]) & first[None, :]
    tile_start = tl.sum(tl.where(smaller, tiles[None, :], 0), axis=1)
    pair_start = _store_tiles_and_padding(counts, tiles, tile_start, tl.sum(tiles, axis=0), local, first, M, block_m,
                                          num_pairs, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr, 0, 1)
    tl.store(sorted_ptr + pair_start + rank, pair, mask=valid)


@triton.jit
def _store_pairs(slot, t0, before, pair_start, sorted_ptr, TOKENS: tl.constexpr, TOP_K: tl.constexpr):
    """Pairs of tokens [t0, t0 + TOKENS) at their slots; ``before``: pairs of earlier tokens per expert."""
    picked = (slot >= 0).to(tl.int32)
    rank = tl.cumsum(picked, axis=0) - picked + before[None, :]
    t = t0 + tl.arange(0, TOKENS)
    tl.store(sorted_ptr + pair_start[None, :] + rank, t[:, None] * TOP_K + slot, mask=slot >= 0)
    return before + tl.sum(picked, axis=0)


@triton.jit
def selection_of_local_ids(local, K_PAD: tl.constexpr, L_PAD: tl.constexpr):
    """_selection's [TOKENS, L_PAD] from local expert ids already in registers ([TOKENS, K_PAD] int32,
    -1 for slots past top-k, pairs of no local expert and rows past M)."""
    e = tl.arange(0, L_PAD)[None, None, :]
    k = tl.arange(0, K_PAD)[None, :, None]
    return tl.max(tl.where(local[:, :, None] == e, k, -1), axis=1)


@triton.jit
def align_selection(slot, M, L, block_m, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr,
                    TOKENS: tl.constexpr, L_PAD: tl.constexpr, TOP_K: tl.constexpr):
    """The whole alignment of M <= TOKENS tokens from their selection (_selection's format)."""
    e = tl.arange(0, L_PAD)
    counts = tl.sum((slot >= 0).to(tl.int32), axis=0)
    pair_start = _tiles_and_padding(counts, e, e < L, M, block_m, M * TOP_K, max_tiles, sorted_ptr,
                                    tile_expert_ptr, num_tiles_ptr, 0, 1)
    _store_pairs(slot, 0, tl.zeros((L_PAD,), dtype=tl.int32), pair_start, sorted_ptr, TOKENS, TOP_K)


@triton.jit
def align_pairs_cta(
    ids_ptr, stride_im, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m, max_tiles,
    TOKENS: tl.constexpr, L_PAD: tl.constexpr, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    num_pairs = M * TOP_K
    e = tl.arange(0, L_PAD)
    if ONE_CHUNK:  # M <= TOKENS: the selection is built once and kept
        slot = _selection(ids_ptr, stride_im, map_ptr, 0, M, TOKENS, L_PAD, TOP_K, HAS_MAP)
        align_selection(slot, M, L, block_m, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr, TOKENS, L_PAD,
                        TOP_K)
    else:
        counts = tl.zeros((L_PAD,), dtype=tl.int32)
        for t0 in range(0, M, TOKENS):
            slot = _selection(ids_ptr, stride_im, map_ptr, t0, M, TOKENS, L_PAD, TOP_K, HAS_MAP)
            counts += tl.sum((slot >= 0).to(tl.int32), axis=0)
        pair_start = _tiles_and_padding(counts, e, e < L, M, block_m, num_pairs, max_tiles, sorted_ptr,
                                        tile_expert_ptr, num_tiles_ptr, 0, 1)
        before = tl.zeros((L_PAD,), dtype=tl.int32)  # pairs of earlier chunks, per expert
        for t0 in range(0, M, TOKENS):
            slot = _selection(ids_ptr, stride_im, map_ptr, t0, M, TOKENS, L_PAD, TOP_K, HAS_MAP)
            before = _store_pairs(slot, t0, before, pair_start, sorted_ptr, TOKENS, TOP_K)


@triton.jit
def _align_kernel(
    ids_ptr, stride_im, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m, max_tiles,
    TOKENS: tl.constexpr, L_PAD: tl.constexpr, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
    ONE_CHUNK: tl.constexpr, PAIRS: tl.constexpr, PDL: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    """PAIRS > 0: all M * TOP_K <= PAIRS pairs at once (align_pair_list); else the selection."""
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()  # the next launch reads nothing written here (run_experts)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the ids come from the kernel before (a programmatic dependent launch)
    if PAIRS > 0:
        local = _local_experts(ids_ptr, stride_im, map_ptr, 0, M * TOP_K, PAIRS, TOP_K, HAS_MAP)
        align_pair_list(local, M, M * TOP_K, block_m, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr)
    else:
        align_pairs_cta(ids_ptr, stride_im, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m,
                        max_tiles, TOKENS, L_PAD, TOP_K, HAS_MAP, ONE_CHUNK)


@triton.jit
def _local_experts(ids_ptr, stride_im, map_ptr, p0, num_pairs, PAIRS: tl.constexpr, TOP_K: tl.constexpr,
                   HAS_MAP: tl.constexpr):
    """Local expert of pairs [p0, p0 + PAIRS) (pair p = token * TOP_K + slot), -1 where not local or past the end."""
    p = p0 + tl.arange(0, PAIRS)
    token = p // TOP_K
    expert = tl.load(ids_ptr + token * stride_im + (p - token * TOP_K), mask=p < num_pairs, other=-1).to(tl.int32)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=expert >= 0, other=-1)
    return expert


@triton.jit
def _store_my_pairs(local, p0, my_e, my_start, before, sorted_ptr, PAIRS: tl.constexpr):
    """Stores the pairs [p0, p0 + PAIRS) of my experts ``my_e`` at their sorted positions; a pair's rank
    is the number of pairs of the same expert before it (pair order is token order), ``before``
    counting those of earlier chunks. Returns ``before`` with this chunk's pairs added."""
    picked = (local[:, None] == my_e[None, :]).to(tl.int32)
    rank = tl.cumsum(picked, axis=0) - picked + before[None, :]
    pair = p0 + tl.arange(0, PAIRS)
    tl.store(sorted_ptr + my_start[None, :] + rank, pair[:, None] + tl.zeros_like(rank), mask=picked != 0)
    return before + tl.sum(picked, axis=0)


@triton.jit
def _align_parallel_kernel(
    ids_ptr, stride_im, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m, max_tiles,
    PAIRS: tl.constexpr, L_PAD: tl.constexpr, EXPERTS: tl.constexpr, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
    ONE_CHUNK: tl.constexpr, PDL: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    """One program per EXPERTS local experts. Each counts every expert's pairs (a histogram of the
    ids: every program needs the runs before its own), then writes its experts' tiles, padding
    and pairs, and a strided share of the unused tail; no program waits for another. ONE_CHUNK
    (all pairs in one chunk of PAIRS): the ids are loaded once for both passes, so the ranking does
    not wait for a second round trip to the ids and the expert map (H100, session 14, dsv3 preamble at
    M = 16 / 64: 12.8 / 15.9 -> 12.5 / 15.6 us)."""
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    num_pairs = M * TOP_K
    if ONE_CHUNK:
        first = _local_experts(ids_ptr, stride_im, map_ptr, 0, num_pairs, PAIRS, TOP_K, HAS_MAP)
        counts = tl.histogram(first, L_PAD, mask=first >= 0)
    else:
        counts = tl.zeros((L_PAD,), dtype=tl.int32)
        for p0 in range(0, num_pairs, PAIRS):
            local = _local_experts(ids_ptr, stride_im, map_ptr, p0, num_pairs, PAIRS, TOP_K, HAS_MAP)
            counts += tl.histogram(local, L_PAD, mask=local >= 0)
    e = tl.arange(0, L_PAD)
    pair_start = _tiles_and_padding(counts, e, (e // EXPERTS == pid) & (e < L), M, block_m, num_pairs, max_tiles,
                                    sorted_ptr, tile_expert_ptr, num_tiles_ptr, pid, tl.num_programs(0))
    my_e = pid * EXPERTS + tl.arange(0, EXPERTS)
    my_start = tl.sum(tl.where(e[None, :] == my_e[:, None], pair_start[None, :], 0), axis=1)
    before = tl.zeros((EXPERTS,), dtype=tl.int32)
    if ONE_CHUNK:
        _store_my_pairs(first, 0, my_e, my_start, before, sorted_ptr, PAIRS)
    else:
        for p0 in range(0, num_pairs, PAIRS):
            local = _local_experts(ids_ptr, stride_im, map_ptr, p0, num_pairs, PAIRS, TOP_K, HAS_MAP)
            before = _store_my_pairs(local, p0, my_e, my_start, before, sorted_ptr, PAIRS)


def align_meta(num_local_experts: int, top_k: int, expert_map: Optional[torch.Tensor], M: int = 1 << 30) -> dict:
    l_pad = triton.next_power_of_2(num_local_experts)
    tokens = min(64, triton.next_power_of_2(max(M, 1)), MAX_SELECTION_TILE // l_pad)
    return dict(TOKENS=max(1, tokens), L_PAD=l_pad, TOP_K=top_k,
                HAS_MAP=expert_map is not None, ONE_CHUNK=M <= max(1, tokens))


def align_meta_after_routing(num_local_experts: int, top_k: int, expert_map: Optional[torch.Tensor], M: int) -> dict:
    """align_meta for a kernel that routes first: its routing constexprs already carry TOP_K."""
    meta = align_meta(num_local_experts, top_k, expert_map, M)
    del meta["TOP_K"]
    return meta


def align_fits(num_local_experts: int) -> bool:
    return triton.next_power_of_2(num_local_experts) <= MAX_SELECTION_TILE


def align_pairs_fastest(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor], num_local_experts: int,
                        block_m: int, launch_dependents: bool = False):
    """reference.align_pairs' result from whichever is faster for these ids: the kernels up to
    ALIGN_KERNEL_MAX_M tokens (where the local experts fit their selection tile), torch's sort above.
    launch_dependents: a kernel launched next as a programmatic dependent may start at once (it
    must not read the alignment before waiting for it)."""
    if 0 < topk_ids.shape[0] <= ALIGN_KERNEL_MAX_M and align_fits(num_local_experts):
        # int64 ids (torch.topk's) are read as they are: a cast would be a launch of its own.
        ids = topk_ids if topk_ids.dtype in (torch.int32, torch.int64) else topk_ids.to(torch.int32)
        return align_pairs(ids.contiguous(), expert_map, num_local_experts, block_m,
                           launch_dependents=launch_dependents)
    return reference.align_pairs(topk_ids, expert_map, num_local_experts, block_m)


def alloc_align_outputs(M: int, top_k: int, num_local_experts: int, block_m: int, device):
    max_tiles = reference.max_aligned_tiles(M * top_k, num_local_experts, block_m)
    return (torch.empty(max_tiles * block_m, dtype=torch.int32, device=device),
            torch.empty(max_tiles, dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.int32, device=device))


def align_pairs(topk_ids: torch.Tensor, expert_map: Optional[torch.Tensor], num_local_experts: int, block_m: int,
                pdl: bool = False, parallel: Optional[bool] = None, launch_dependents: bool = False):
    """Same contract as ``reference.align_pairs`` (for moderate M; ids int32 or int64); ``pdl``:
    launched as a programmatic dependent of the kernel that writes topk_ids (CUDA only).
    ``parallel``: the many-program kernel or the one-program one (default: PARALLEL_MIN_M,
    PARALLEL_MIN_L and ONE_PROGRAM_MAX_M). ``launch_dependents``: let the next launch, a
    programmatic dependent that reads nothing written here, start at once."""
    M, top_k = topk_ids.shape
    sorted_ids, tile_expert, num_tiles = alloc_align_outputs(M, top_k, num_local_experts, block_m, topk_ids.device)
    args = (topk_ids, topk_ids.stride(0), topk_ids if expert_map is None else expert_map, sorted_ids, tile_expert,
            num_tiles, M, num_local_experts, block_m, tile_expert.numel())
    launch = pdl_launch(pdl)
    if parallel is None:
        parallel = M > ONE_PROGRAM_MAX_M or M >= PARALLEL_MIN_M and num_local_experts >= PARALLEL_MIN_L
    if parallel:
        l_pad = triton.next_power_of_2(num_local_experts)
        experts = min(PARALLEL_EXPERTS, l_pad)
        _align_parallel_kernel[(triton.cdiv(num_local_experts, experts),)](
            *args, PAIRS=min(PARALLEL_PAIRS, triton.next_power_of_2(M * top_k)), L_PAD=l_pad, EXPERTS=experts,
            TOP_K=top_k, HAS_MAP=expert_map is not None, ONE_CHUNK=M * top_k <= PARALLEL_PAIRS,
            PDL=pdl, LAUNCH_DEPENDENTS=launch_dependents,
            num_warps=PARALLEL_WARPS, **launch,
        )
    else:
        pair_list = M * top_k <= PAIR_LIST_MAX_PAIRS
        _align_kernel[(1,)](*args, **align_meta(num_local_experts, top_k, expert_map, M),
                            PAIRS=triton.next_power_of_2(M * top_k) if pair_list else 0, PDL=pdl,
                            LAUNCH_DEPENDENTS=launch_dependents,
                            num_warps=PAIR_LIST_WARPS if pair_list else ALIGN_NUM_WARPS if M <= 16
                            else ALIGN_NUM_WARPS_ABOVE_16, **launch)
    return sorted_ids, tile_expert, num_tiles
