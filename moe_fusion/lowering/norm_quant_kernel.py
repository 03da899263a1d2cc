"""RMSNorm and per-token-group fp8 quantisation of the MoE input, one program per token, as
``reference.rms_norm`` and ``reference.quantize_fp8_groups`` define them.

The same launch zeroes the router kernel's workspace (its split-K logits accumulator and its
"last program" ticket), so the preamble needs no memset launches.

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

# A row of up to 64 groups of 128 (8192 elements) in one chunk: x and the norm weight in one load
# round trip, which is what a decode-sized launch waits on.
MAX_CHUNK_GROUPS = 64

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _div_rn(a, b):
    """Correctly rounded a / b with broadcasting (torch's division, bit for bit)."""
    a, b = tl.broadcast(a, b)
    return tl.math.div_rn(a, b)


@triton.jit
def _inv_rms(sq, h_float, eps):
    """r = 1 / sqrt(mean + eps) from the fp32 squares, correctly rounded step by step as torch does."""
    mean_sq = tl.math.div_rn(tl.sum(tl.sum(sq, axis=1), axis=0), h_float)
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
    zero_ptr, stride_zm, zero_cols, ticket_ptr, H, h_float, eps,
    HAS_NORM: tl.constexpr, QUANT: tl.constexpr, ZERO_WORKSPACE: tl.constexpr, GROUPS: tl.constexpr,
    IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ZERO_BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        # The router kernel may launch (and stream its weight) now: it waits for this whole grid
        # (griddepcontrol.wait) before it reads normed or touches the workspace zeroed here.
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    CHUNK: tl.constexpr = GROUPS * 128
    grid2d = tl.arange(0, GROUPS)[:, None] * 128 + tl.arange(0, 128)[None, :]  # [GROUPS, 128]
    x_row = x_ptr + row * stride_xm

    if ONE_CHUNK:
        # The whole row at once: x and the norm weight are loaded together (one memory round trip)
        # and kept in registers; the workspace stores go out while those loads are in flight.
        in_row = grid2d < H
        x = tl.load(x_row + grid2d, mask=in_row, other=0.0).to(tl.float32)
        w = x
        if HAS_NORM:
            w = tl.load(norm_w_ptr + grid2d, mask=in_row, other=0.0).to(tl.float32)
    if ZERO_WORKSPACE:
        z = tl.arange(0, ZERO_BLOCK)
        for c0 in range(0, zero_cols, ZERO_BLOCK):
            tl.store(zero_ptr + row * stride_zm + c0 + z, tl.zeros((ZERO_BLOCK,), tl.float32),
                     mask=c0 + z < zero_cols)
        if row == 0:
            tl.store(ticket_ptr, 0)

    if ONE_CHUNK:
        r = 1.0
        if HAS_NORM:
            r = _inv_rms(x * x, h_float, eps)
        _store_chunk(x, w, r, grid2d, in_row, row, normed_ptr, stride_nm, q_ptr, stride_qm, scale_ptr, stride_sm,
                     0, H, HAS_NORM, QUANT, GROUPS, IN_DTYPE, OUT_DTYPE)
    else:
        r = 1.0
        if HAS_NORM:
            sq = tl.zeros((GROUPS, 128), dtype=tl.float32)
            for c0 in range(0, H, CHUNK):
                x = tl.load(x_row + c0 + grid2d, mask=c0 + grid2d < H, other=0.0).to(tl.float32)
                sq += x * x
            r = _inv_rms(sq, h_float, eps)
        for c0 in range(0, H, CHUNK):
            offs = c0 + grid2d
            in_row = offs < H
            x = tl.load(x_row + offs, mask=in_row, other=0.0).to(tl.float32)
            w = x
            if HAS_NORM:
                w = tl.load(norm_w_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            _store_chunk(x, w, r, offs, in_row, row, normed_ptr, stride_nm, q_ptr, stride_qm, scale_ptr, stride_sm,
                         c0, H, HAS_NORM, QUANT, GROUPS, IN_DTYPE, OUT_DTYPE)


def _check_constants():
    # The kernel spells these out as literals; keep them tied to the reference's values.
    assert FP8_BLOCK == 128 and FP8_MAX == 448.0 and FP8_MIN_SCALE == 1e-10


_check_constants()


def norm_quant(
    x: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float, quant: bool,
    logits_workspace: Optional[torch.Tensor] = None, ticket: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None, pdl: bool = False,
):
    """(normed [M, H], x_fp8 [M, H] or empty, x_scale [M, ceil(H/128)] or empty); also zeroes the
    workspace when given. ``out_dtype`` is the dtype of weight * normed (torch's promotion).
    ``pdl``: the next kernel is a programmatic dependent launch (CUDA only) that may start early."""
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
    groups = min(triton.next_power_of_2(groups_total), MAX_CHUNK_GROUPS)
    zero = logits_workspace is not None
    _norm_quant_kernel[(M,)](
        x, x.stride(0), norm_weight if norm_weight is not None else x, normed, normed.stride(0),
        x_fp8, H if quant else 0, x_scale, groups_total if quant else 0,
        logits_workspace if zero else x, logits_workspace.stride(0) if zero else 0,
        logits_workspace.shape[1] if zero else 0, ticket if ticket is not None else x, H, float(H), eps,
        HAS_NORM=norm_weight is not None, QUANT=quant, ZERO_WORKSPACE=zero, GROUPS=groups,
        IN_DTYPE=_TL[x.dtype], OUT_DTYPE=_TL[out_dtype],
        ZERO_BLOCK=128 if not zero else min(triton.next_power_of_2(logits_workspace.shape[1]), 1024),
        ONE_CHUNK=groups_total <= groups, PDL=pdl, num_warps=max(4, min(8, groups // 4)),
    )
    return normed, x_fp8, x_scale
