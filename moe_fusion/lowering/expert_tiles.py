"""Triton helpers shared by the two expert GEMM kernels: which work item a program takes, and
the fp8 activation quantisation both GEMMs do on their A tiles.

The quantisation is reference.quantize_fp8_groups restated for one [BLOCK_M, 128] tile: one
K block of the GEMM is exactly one 1x128 activation group, so a GEMM can quantise its A operand
as it loads it, with the same arithmetic (IEEE divisions, round-to-nearest e4m3 cast).
"""
import os

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
FP8_MIN_SCALE = tl.constexpr(1e-10)  # reference.FP8_MIN_SCALE
# The interpreter's fp32 -> e4m3 cast drops the carry when rounding up across a power of two
# (125.2 -> 64): under TRITON_INTERPRET=1 values are rounded to e4m3 in fp32 first, so its cast is
# exact. Compiled kernels use the hardware's round-to-nearest cast directly.
ROUND_BEFORE_FP8_CAST = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# What the A operand of a GEMM is (a constexpr of both kernels).
A_MODEL_DTYPE = tl.constexpr(0)  # bf16/fp16 activations, bf16/fp16 weights
A_FP8_GIVEN = tl.constexpr(1)  # e4m3 activations with their 1x128 group scales, already quantised
A_FP8_QUANTIZE = tl.constexpr(2)  # bf16/fp16 activations quantised per 1x128 group while loading


@triton.jit
def quantize_group_fp8(a):
    """a: fp32 [BLOCK_M, 128] (zeros where masked) -> (e4m3 [BLOCK_M, 128], fp32 scale [BLOCK_M])."""
    amax = tl.max(tl.abs(a), axis=1)
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), FP8_MIN_SCALE)
    q = tl.math.div_rn(a, scale[:, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    return to_e4m3(q), scale


@triton.jit
def to_e4m3(v):
    """fp32 (already within +-448) -> e4m3, round to nearest even."""
    if ROUND_BEFORE_FP8_CAST:
        # e4m3 has 3 mantissa bits and no exponent below -6: the spacing at v is
        # 2^(max(exponent(v), -6) - 3); adding and removing 1.5 * 2^23 spacings rounds to it.
        biased_exponent = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
        spacing = (tl.maximum(biased_exponent - 3, 127 - 9) << 23).to(tl.float32, bitcast=True)
        magic = spacing * 12582912.0
        v = (v + magic) - magic
    return v.to(tl.float8e4nv)


@triton.jit
def token_tile(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M: tl.constexpr):
    """Pair ids of one aligned token tile and which of its rows are real (padding = num_pairs)."""
    offs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs)
    return pair, pair < num_pairs


@triton.jit
def load_tile(ptrs, row_ok, col_ok, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A 2-D tile whose rows/columns may run past the matrix; EVEN_* drop the masks that cannot fail."""
    if EVEN_ROWS and EVEN_COLS:
        return tl.load(ptrs)
    elif EVEN_ROWS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif EVEN_COLS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask L2 for the lines at ptrs (one prefetch per element; pass one pointer per 128-byte line)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )
