"""RMSNorm and per-token-group fp8 quantisation of the MoE input, as ``reference.rms_norm`` and
``reference.quantize_fp8_groups`` define them.

A row is spread over programs of ``chunk_groups`` groups of 128 each (grid: rows x chunks).
Every program recomputes the row's statistic from the whole row (from L2 after the first
reader) and normalises and quantises only its chunk: one program per row was a chain of
dependent latencies (5.2 us for a 7168-wide row on the H100, v4), and the element work, not the
bytes, was the long pole.

The same launch zeroes the router kernel's workspace (its split-K logits accumulator and its
counters), so the preamble needs no memset launches.

Rounding follows the reference step by step: the statistic in fp32, x * r rounded to the model
dtype, times the weight rounded again; divisions and the square root are the correctly rounded
ones (``div_rn``, ``sqrt_rn``) so the fp8 scales match torch bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..spec import FP8_BLOCK, FP8_DTYPE, FP8_MAX
from .expert_tiles import to_e4m3
from .reference import FP8_MIN_SCALE

# Groups of 128 per program (dsv3's 56 groups: 14 or 7 programs per row). H100, v5, the norm alone:
# 4 groups 2.33 / 2.66 / 5.36 us at M = 1 / 16 / 64, 8 groups 2.61 / 2.80 / 3.79, 64 (v4's one
# program per row) 6.55 / 6.70 / 7.18.
SMALL_M_CHUNK_GROUPS, CHUNK_GROUPS, SMALL_M = 4, 8, 16
# The statistic's loop step over the row (one step up to H = 8192).
MAX_ROW_BLOCK = 8192
# Counters the router kernel uses (zeroed here): partial logits done, rows routed.
N_COUNTERS = 2

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _div_rn(a, b):
    """Correctly rounded a / b with broadcasting (torch's division, bit for bit)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def _inv_rms(x_row, H, h_float, eps, ROW_BLOCK: tl.constexpr):
    """r = 1 / sqrt(mean(x^2) + eps) of the whole row, correctly rounded step by step as torch does;
    the same bits in every program of the row (same loads, same reduction order)."""
    sq = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    for c0 in range(0, H, ROW_BLOCK):
        offs = c0 + tl.arange(0, ROW_BLOCK)
        x = tl.load(x_row + offs, mask=offs < H, other=0.0).to(tl.float32)
        sq += x * x
    mean_sq = tl.math.div_rn(tl.sum(sq, axis=0), h_float)
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_sq + eps))


@triton.jit
def _store_chunk(x, w, r, offs, in_row, row, normed_ptr, stride_nm, q_ptr, stride_qm, scale_ptr, stride_sm, c0, H,
                 HAS_NORM: tl.constexpr, QUANT: tl.constexpr, GROUPS: tl.constexpr, IN_DTYPE: tl.constexpr,
                 OUT_DTYPE: tl.constexpr):
    """normed = w * (x * r rounded to the input dtype) of one chunk, and its fp8 groups."""
    if HAS_NORM:
        normed = (w * (x * r).to(IN_DTYPE).to(tl.float32)).to(OUT_DTYPE)
    else:
        normed = x.to(OUT_DTYPE)
    tl.store(normed_ptr + row * stride_nm + offs, normed, mask=in_row)
    if QUANT:
        v = normed.to(tl.float32)
        scale = tl.maximum(_div_rn(tl.max(tl.abs(v), axis=1), tl.full((GROUPS,), 448.0, tl.float32)), 1e-10)
        q = _div_rn(v, scale[:, None])
        q = to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
        tl.store(q_ptr + row * stride_qm + offs, q, mask=in_row)
        g = tl.arange(0, GROUPS)
        tl.store(scale_ptr + row * stride_sm + c0 // 128 + g, scale, mask=c0 + g * 128 < H)


@triton.jit
def _norm_quant_kernel(
    x_ptr, stride_xm, norm_w_ptr, normed_ptr, stride_nm, q_ptr, stride_qm, scale_ptr, stride_sm,
    zero_ptr, stride_zm, zero_cols, counters_ptr, H, h_float, eps,
    HAS_NORM: tl.constexpr, QUANT: tl.constexpr, ZERO_WORKSPACE: tl.constexpr, GROUPS: tl.constexpr,
    ROW_BLOCK: tl.constexpr, IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ZERO_BLOCK: tl.constexpr,
    N_COUNTERS: tl.constexpr, PDL: tl.constexpr,
):
    """Grid (rows, chunks of GROUPS x 128 columns)."""
    if PDL:
        # The router kernel may launch (and stream its weight) now: it waits for this whole grid
        # (griddepcontrol.wait) before it reads normed or touches the workspace zeroed here.
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    c0 = chunk * (GROUPS * 128)
    offs = c0 + tl.arange(0, GROUPS)[:, None] * 128 + tl.arange(0, 128)[None, :]  # [GROUPS, 128]
    in_row = offs < H
    x_row = x_ptr + row * stride_xm
    # The chunk's loads go out first; the statistic's loads of the whole row follow.
    x = tl.load(x_row + offs, mask=in_row, other=0.0).to(tl.float32)
    w = x
    if HAS_NORM:
        w = tl.load(norm_w_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    if ZERO_WORKSPACE:
        z = tl.arange(0, ZERO_BLOCK)
        for z0 in range(chunk * ZERO_BLOCK, zero_cols, tl.num_programs(1) * ZERO_BLOCK):
            tl.store(zero_ptr + row * stride_zm + z0 + z, tl.zeros((ZERO_BLOCK,), tl.float32),
                     mask=z0 + z < zero_cols)
        if (row == 0) & (chunk == 0):
            tl.store(counters_ptr + tl.arange(0, N_COUNTERS), tl.zeros((N_COUNTERS,), tl.int32))
    r = 1.0
    if HAS_NORM:
        r = _inv_rms(x_row, H, h_float, eps, ROW_BLOCK)
    _store_chunk(x, w, r, offs, in_row, row, normed_ptr, stride_nm, q_ptr, stride_qm, scale_ptr, stride_sm,
                 c0, H, HAS_NORM, QUANT, GROUPS, IN_DTYPE, OUT_DTYPE)


def _check_constants():
    # The kernel spells these out as literals; keep them tied to the reference's values.
    assert FP8_BLOCK == 128 and FP8_MAX == 448.0 and FP8_MIN_SCALE == 1e-10


_check_constants()


def norm_quant(
    x: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float, quant: bool,
    logits_workspace: Optional[torch.Tensor] = None, counters: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None, pdl: bool = False, chunk_groups: Optional[int] = None,
):
    """(normed [M, H], x_fp8 [M, H] or empty, x_scale [M, ceil(H/128)] or empty); also zeroes the
    workspace (logits and ``N_COUNTERS`` int32 counters) when given. ``out_dtype`` is the dtype of
    weight * normed (torch's promotion). ``pdl``: the next kernel is a programmatic dependent launch
    (CUDA only) that may start early."""
    M, H = x.shape
    assert x.stride(1) == 1, "rows of x must be contiguous"
    out_dtype = out_dtype or x.dtype
    normed = torch.empty((M, H), dtype=out_dtype, device=x.device)
    groups_total = triton.cdiv(H, FP8_BLOCK)
    if quant:
        x_fp8 = torch.empty((M, H), dtype=FP8_DTYPE, device=x.device)
        x_scale = torch.empty((M, groups_total), dtype=torch.float32, device=x.device)
    else:
        x_fp8 = torch.empty((0,), dtype=FP8_DTYPE, device=x.device)
        x_scale = torch.empty((0,), dtype=torch.float32, device=x.device)
    if M == 0:
        return normed, x_fp8, x_scale
    zero = logits_workspace is not None
    assert not zero or (counters is not None and counters.numel() >= N_COUNTERS)
    chunk_groups = chunk_groups or (SMALL_M_CHUNK_GROUPS if M <= SMALL_M else CHUNK_GROUPS)
    groups = min(triton.next_power_of_2(groups_total), triton.next_power_of_2(chunk_groups))
    _norm_quant_kernel[(M, triton.cdiv(groups_total, groups))](
        x, x.stride(0), norm_weight if norm_weight is not None else x, normed, normed.stride(0),
        x_fp8, H if quant else 0, x_scale, groups_total if quant else 0,
        logits_workspace if zero else x, logits_workspace.stride(0) if zero else 0,
        logits_workspace.shape[1] if zero else 0, counters if zero else x, H, float(H), eps,
        HAS_NORM=norm_weight is not None, QUANT=quant, ZERO_WORKSPACE=zero, GROUPS=groups,
        ROW_BLOCK=min(triton.next_power_of_2(H), MAX_ROW_BLOCK), IN_DTYPE=_TL[x.dtype], OUT_DTYPE=_TL[out_dtype],
        ZERO_BLOCK=128 if not zero else min(triton.next_power_of_2(logits_workspace.shape[1]), 256),
        N_COUNTERS=N_COUNTERS, PDL=pdl, num_warps=4,
    )
    return normed, x_fp8, x_scale
