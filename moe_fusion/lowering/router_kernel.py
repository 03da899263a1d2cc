"""Router GEMM (split-K over the hidden size), optionally with the whole rest of the preamble in
the same launch: routing and alignment run in extra programs after the GEMM's.

Decode is bound by reading the router weight once (dsv3: 256 x 7168 bf16, 3.7 MB), so the
weight is split over (k-chunk, expert-block) programs, about two per SM, all of it in flight at
once. Partial logits are added with fp32 atomics into a zeroed [M, E] workspace.

The one-launch kernel (``_router_route_align_kernel``) appends programs to the GEMM's 1-D grid:
one per block of rows that routes them (``topk_kernel.route_rows``) once every GEMM program has
counted itself done, and a last one that aligns (``align_kernel.align_pairs_cta``) once every
row is routed. They wait on counters (zeroed by the norm kernel) with acquire loads; the GEMM and
routing programs count themselves done with a release after a CTA barrier. No second launch, no
host synchronisation, and the routing of M rows runs in parallel instead of in the one program
that finished last (v4: 8 us for one row, 41 us for 16). The waiting programs have the highest
ids: a GPU dispatches them last, after every program they wait for (so a grid larger than the
GPU cannot deadlock), and the Triton interpreter, which runs programs one after another in id
order, finds every counter complete when it gets to them.

Precision is the reference's: with ``router_fp32`` and half-precision operands the products are
exact in fp32, so a half-precision dot with fp32 accumulation is the upcast GEMM; fp32 operands
use an IEEE fp32 dot (no tf32); a model-dtype router casts the weight to the model dtype and
its logits are rounded to it in the epilogue.

With ``PDL`` the kernel is a programmatic dependent launch of the norm kernel: it starts while the
norm runs, requests its first weight tile, and only then waits (griddepcontrol.wait: the norm grid
complete, its writes visible) before reading the normed rows or touching the zeroed workspace.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .align_kernel import align_pairs_cta
from .grid_sync import count_done, wait_until
from .topk_kernel import load_route_bias, route_rows


@triton.jit
def _dot_step(acc, a_ptr, stride_am, b, rows, k, M, H, DOT_FP32: tl.constexpr):
    a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < H), other=0.0)
    if DOT_FP32:
        return acc + tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return acc + tl.dot(a, tl.trans(b.to(a.dtype)))


@triton.jit
def _partial_logits(a_ptr, stride_am, w_ptr, stride_we, stride_wk, M, E, H, row0, col0, k_lo, k_hi,
                    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr):
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BE)
    kk = tl.arange(0, BK)
    w_rows = w_ptr + cols[:, None] * stride_we
    # The first weight tile is requested before waiting for the kernel that writes the activations
    # (PDL): the router weight's HBM stream overlaps the norm kernel.
    b = tl.load(w_rows + (k_lo + kk)[None, :] * stride_wk, mask=(cols[:, None] < E) & (k_lo + kk < H)[None, :],
                other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = _dot_step(tl.zeros((BM, BE), dtype=tl.float32), a_ptr, stride_am, b, rows, k_lo + kk, M, H, DOT_FP32)
    for k0 in range(k_lo + BK, k_hi, BK):
        k = k0 + kk
        b = tl.load(w_rows + k[None, :] * stride_wk, mask=(cols[:, None] < E) & (k < H)[None, :], other=0.0)
        acc = _dot_step(acc, a_ptr, stride_am, b, rows, k, M, H, DOT_FP32)
    return acc


@triton.jit
def _router_kernel(
    a_ptr, stride_am, w_ptr, stride_we, stride_wk, logits_ptr, stride_lm, M, E, H, k_per_program,
    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr,
):
    """Split-K partial logits added into logits [M, E]; grid (k-chunks, expert blocks, row blocks)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the routing kernel waits for this grid to finish
    row0 = tl.program_id(2) * BM
    col0 = tl.program_id(1) * BE
    k_lo = tl.program_id(0) * k_per_program
    acc = _partial_logits(a_ptr, stride_am, w_ptr, stride_we, stride_wk, M, E, H, row0, col0, k_lo,
                          k_lo + k_per_program, BM, BE, BK, DOT_FP32, PDL)
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BE)
    tl.atomic_add(logits_ptr + rows[:, None] * stride_lm + cols[None, :], acc,
                  mask=(rows[:, None] < M) & (cols[None, :] < E), sem="relaxed")


@triton.jit
def _router_route_align_kernel(
    a_ptr, stride_am, w_ptr, stride_we, stride_wk, logits_ptr, stride_lm, counters_ptr, M, E, H, k_per_program,
    k_splits, gemm_programs, route_programs,
    # routing
    bias_ptr, ids_ptr, weights_ptr, stride_om, renorm_eps, routed_scale,
    # alignment
    map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, L, block_m, max_tiles,
    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr,
    ROWS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr, EPG: tl.constexpr,
    EPG_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, SCORE_BEFORE_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_MAX: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr, SORT_PICKS: tl.constexpr,
    TOKENS: tl.constexpr, L_PAD: tl.constexpr, HAS_MAP: tl.constexpr, ONE_CHUNK: tl.constexpr,
    ALIGN: tl.constexpr, PDL: tl.constexpr,
):
    """All M rows in one row block (M <= BM). 1-D grid: gemm_programs (k-chunk fastest, then
    expert block), route_programs of ROWS rows each, then one alignment program when ALIGN."""
    pid = tl.program_id(0)
    if pid < gemm_programs:
        col0 = (pid // k_splits) * BE
        k_lo = (pid % k_splits) * k_per_program
        acc = _partial_logits(a_ptr, stride_am, w_ptr, stride_we, stride_wk, M, E, H, 0, col0, k_lo,
                              k_lo + k_per_program, BM, BE, BK, DOT_FP32, PDL)
        rows = tl.arange(0, BM)
        cols = col0 + tl.arange(0, BE)
        tl.atomic_add(logits_ptr + rows[:, None] * stride_lm + cols[None, :], acc,
                      mask=(rows[:, None] < M) & (cols[None, :] < E), sem="relaxed")
        count_done(counters_ptr)
    elif pid < gemm_programs + route_programs:
        bias = load_route_bias(bias_ptr, HAS_BIAS, N_GROUP, G_PAD, EPG, EPG_PAD)
        if PDL:
            tl.extra.cuda.gdc_wait()  # the counters are zeroed by the norm kernel
        wait_until(counters_ptr, gemm_programs)
        route_rows(logits_ptr, stride_lm, bias, ids_ptr, weights_ptr, stride_om, (pid - gemm_programs) * ROWS, M,
                   renorm_eps, routed_scale, ROWS, N_GROUP, G_PAD, EPG, EPG_PAD, TOP_K, K_PAD, TOPK_GROUP, SCORING,
                   SCORE_BEFORE_TOPK, HAS_BIAS, GROUP_MAX, RENORMALIZE, ROUND_TO, SORT_PICKS, True)
        if ALIGN:
            count_done(counters_ptr + 1)
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
        wait_until(counters_ptr + 1, route_programs)
        align_pairs_cta(ids_ptr, stride_om, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m,
                        max_tiles, TOKENS, L_PAD, TOP_K, HAS_MAP, ONE_CHUNK)
