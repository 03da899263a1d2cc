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
With ``NORM`` (few rows: preamble.ROUTER_NORMS_MAX_M) it reads x instead and normalises it with the
norm kernel's own helpers (r from the whole row, the same roundings and reduction order, so the
same bits), so its whole weight stream and dot run beside the norm kernel; it waits only before
its atomics, for the workspace the norm kernel zeroes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .align_kernel import align_pairs_cta
from .grid_sync import count_done, wait_until
from .norm_quant_kernel import inv_rms, rms_normed
from .topk_kernel import load_route_bias, route_rows


@triton.jit
def _dot_step(acc, a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return acc + tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return acc + tl.dot(a, tl.trans(b.to(a.dtype)))


@triton.jit
def _rows_inv_rms(a_ptr, stride_am, row0, M, H, h_float, eps, BM: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """norm_quant_kernel.inv_rms of rows [row0, row0 + BM) (1 past M), bit for bit the norm kernel's."""
    r = tl.full((BM,), 1.0, tl.float32)
    for i in range(0, tl.minimum(BM, M - row0)):
        r = tl.where(tl.arange(0, BM) == i, inv_rms(a_ptr + (row0 + i) * stride_am, H, h_float, eps, ROW_BLOCK), r)
    return r


@triton.jit
def _a_tile(a_ptr, stride_am, rows, k, M, H, r, norm_w_ptr, NORM: tl.constexpr, IN_DTYPE: tl.constexpr,
            OUT_DTYPE: tl.constexpr):
    """The router's activations [rows, k]: the normed rows, or with NORM made here from x [M, H] with
    the norm kernel's arithmetic (norm_quant_kernel.rms_normed, r from _rows_inv_rms)."""
    a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < H), other=0.0)
    if NORM:
        w = tl.load(norm_w_ptr + k, mask=k < H, other=0.0).to(tl.float32)
        a = rms_normed(a.to(tl.float32), w[None, :], r[:, None], IN_DTYPE, OUT_DTYPE)
    return a


@triton.jit
def _partial_logits(a_ptr, stride_am, w_ptr, stride_we, stride_wk, M, E, H, row0, col0, k_lo, k_hi,
                    norm_w_ptr, h_float, eps,
                    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr,
                    NORM: tl.constexpr, IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Partial logits of rows [row0, +BM) x experts [col0, +BE) over K [k_lo, k_hi). With NORM the
    activations are x, normalised here, so nothing waits for the norm kernel (the caller waits
    before touching the workspace it zeroes); otherwise (PDL) the wait comes after the first
    weight tile is requested, so that the router weight's HBM stream overlaps the norm kernel."""
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BE)
    kk = tl.arange(0, BK)
    w_rows = w_ptr + cols[:, None] * stride_we
    b = tl.load(w_rows + (k_lo + kk)[None, :] * stride_wk, mask=(cols[:, None] < E) & (k_lo + kk < H)[None, :],
                other=0.0)
    r = tl.full((BM,), 1.0, tl.float32)
    if NORM:
        r = _rows_inv_rms(a_ptr, stride_am, row0, M, H, h_float, eps, BM, ROW_BLOCK)
    elif PDL:
        tl.extra.cuda.gdc_wait()
    a = _a_tile(a_ptr, stride_am, rows, k_lo + kk, M, H, r, norm_w_ptr, NORM, IN_DTYPE, OUT_DTYPE)
    acc = _dot_step(tl.zeros((BM, BE), dtype=tl.float32), a, b, DOT_FP32)
    for k0 in range(k_lo + BK, k_hi, BK):
        k = k0 + kk
        b = tl.load(w_rows + k[None, :] * stride_wk, mask=(cols[:, None] < E) & (k < H)[None, :], other=0.0)
        acc = _dot_step(acc, _a_tile(a_ptr, stride_am, rows, k, M, H, r, norm_w_ptr, NORM, IN_DTYPE, OUT_DTYPE), b,
                        DOT_FP32)
    return acc


@triton.jit
def _router_kernel(
    a_ptr, stride_am, w_ptr, stride_we, stride_wk, logits_ptr, stride_lm, M, E, H, k_per_program,
    norm_w_ptr, h_float, eps,
    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr,
    NORM: tl.constexpr, IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ROW_BLOCK: tl.constexpr,
):
    """Split-K partial logits added into logits [M, E]; grid (k-chunks, expert blocks, row blocks).
    a is the normed rows, or with NORM the norm kernel's input x (normalised here)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the routing kernel waits for this grid to finish
    row0 = tl.program_id(2) * BM
    col0 = tl.program_id(1) * BE
    k_lo = tl.program_id(0) * k_per_program
    acc = _partial_logits(a_ptr, stride_am, w_ptr, stride_we, stride_wk, M, E, H, row0, col0, k_lo,
                          k_lo + k_per_program, norm_w_ptr, h_float, eps, BM, BE, BK, DOT_FP32, PDL,
                          NORM, IN_DTYPE, OUT_DTYPE, ROW_BLOCK)
    if NORM and PDL:
        tl.extra.cuda.gdc_wait()  # the norm kernel zeroes the workspace added into below
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
    GROUP_MAX: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr,
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
                              k_lo + k_per_program, a_ptr, 1.0, 0.0, BM, BE, BK, DOT_FP32, PDL,
                              False, tl.float32, tl.float32, 1)
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
                   SCORE_BEFORE_TOPK, HAS_BIAS, GROUP_MAX, RENORMALIZE, ROUND_TO, True)
        if ALIGN:
            count_done(counters_ptr + 1)
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
        wait_until(counters_ptr + 1, route_programs)
        align_pairs_cta(ids_ptr, stride_om, map_ptr, sorted_ptr, tile_expert_ptr, num_tiles_ptr, M, L, block_m,
                        max_tiles, TOKENS, L_PAD, TOP_K, HAS_MAP, ONE_CHUNK)
