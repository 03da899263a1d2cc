"""Triton helpers shared by the expert kernels: which tile a program takes, masked tile loads,
and the fp8 quantisation arithmetic of reference.quantize_fp8_groups / quantize_fp8_blocks.

Quantisation: scale = max(amax / 448, 1e-10), q = e4m3(clamp(v / scale)), v / scale an IEEE
division and the cast round-to-nearest-even. "amax / 448" is what torch computes: on CUDA torch
divides by a Python scalar as a multiplication by fl32(1/448) (its div_true_kernel), on the CPU
it divides; the kernels do the same on each, so they reproduce the reference bit for bit.
No quantisation happens inside a GEMM's K loop (measured on the H100: quantising the A tile
per K step made GEMM2 4x slower than its weight stream, and a row reduction there keeps the A
tile out of the cp.async pipeline): x comes quantised (preamble or fp8_act_quant_kernel), and
fp8_act_quant_kernel (or gemm1_combine_kernel after a K-split GEMM1) quantises h between the GEMMs.
"""
import os

import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FP8_MAX = tl.constexpr(448.0)
FP8_GROUP = tl.constexpr(128)  # activation quantisation group (1 x 128)
INV_FP8_MAX = tl.constexpr(1.0 / 448.0)  # rounded to fp32 where it meets an fp32 tensor, as torch's
FP8_MIN_SCALE = tl.constexpr(1e-10)  # reference.FP8_MIN_SCALE
SCALE_BY_RECIPROCAL = tl.constexpr(not _INTERPRETED)
# The interpreter's fp32 -> e4m3 cast drops the carry when rounding up across a power of two
# (125.2 -> 64): under TRITON_INTERPRET=1 values are rounded to e4m3 in fp32 first, so its cast is
# exact. Compiled kernels use the hardware's round-to-nearest cast directly.
ROUND_BEFORE_FP8_CAST = tl.constexpr(_INTERPRETED)

# What the A operand of a GEMM is (a constexpr of both kernels).
A_MODEL_DTYPE = tl.constexpr(0)  # bf16/fp16 activations, bf16/fp16 weights
A_FP8 = tl.constexpr(1)  # fp8 weights, e4m3 A with its 1x128 group scales


@triton.jit
def group_scale(amax):
    """The fp32 scale of a quantisation group from its amax (|max|)."""
    if SCALE_BY_RECIPROCAL:
        scale = amax * INV_FP8_MAX
    else:
        scale = tl.math.div_rn(amax, FP8_MAX)
    return tl.maximum(scale, FP8_MIN_SCALE)


@triton.jit
def quantize_with_scale(v, scale):
    """fp32 v, fp32 scale (broadcastable) -> e4m3 v / scale."""
    q = tl.math.div_rn(v, scale)
    return to_e4m3(tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX))


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
def split_item(item, n_blocks, items_per_tile):
    """(tile, K split, column block) of a work item; items_per_tile = n_blocks x splits."""
    tile = item // items_per_tile
    rest = item - tile * items_per_tile
    split = rest // n_blocks
    return tile, split, rest - split * n_blocks


@triton.jit
def routed_tiles(num_tiles_ptr, top_k, m_tiles, DENSE_ALIGNMENT: tl.constexpr):
    """How many tiles the alignment holds: read from it, or with DENSE_ALIGNMENT (every token on each
    of the top_k experts, experts.dense_routing) known without a memory round trip."""
    if DENSE_ALIGNMENT:
        tiles = top_k * m_tiles
    else:
        tiles = tl.load(num_tiles_ptr)
    return tiles


@triton.jit
def work_tile(tile, num_routed, m_tiles, tile_expert_ptr, sorted_pair_ids_ptr, num_pairs, top_k, M,
              BLOCK_M: tl.constexpr, N_SHARED: tl.constexpr, DENSE_ALIGNMENT: tl.constexpr):
    """(expert, row, token, row_ok, shared) of one work tile.

    The alignment's num_routed tiles come first: expert = local routed expert, row = pair id
    (token * top_k + slot). With N_SHARED shared experts a dense tail follows, needing no
    alignment: tile num_routed + s * m_tiles + j holds tokens j*BLOCK_M.. of shared expert s,
    whose rows (in h, y and the pair weights) follow the routed pairs: num_pairs + s * M + token.
    With DENSE_ALIGNMENT the alignment is experts.dense_routing's (tile e * m_tiles + j holds tokens
    j*BLOCK_M.. of expert e, pair token * top_k + e), computed here instead of loaded: at decode,
    the two dependent round trips (tile count, then expert and pair ids) came before the first
    weight request.
    """
    if DENSE_ALIGNMENT:
        expert = tile // m_tiles
        token = (tile - expert * m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        return expert.to(tl.int64), token * top_k + expert, token, token < M, False
    elif N_SHARED == 0:
        expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
        row, row_ok = token_tile(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
        return expert, row, row // top_k, row_ok, False
    else:
        shared = tile >= num_routed
        if shared:
            dense = tile - num_routed
            s = dense // m_tiles
            token = (dense - s * m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = token < M
            row = num_pairs + s * M + token
            expert = s.to(tl.int64)
        else:
            expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
            row, row_ok = token_tile(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
            token = row // top_k
        return expert, row, token, row_ok, shared


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
def tile_dot(a, w, SWAP_AB: tl.constexpr):
    """a [M, K] . w [N, K]^T as [M, N], or with SWAP_AB its transpose w . a^T [N, M]: at decode M is
    a 16-row token tile, below the 64 rows Hopper's wgmma needs; swapped, the weight rows fill that
    side, and fp8 runs on the native fp8 MMA instead of converting both operands to fp16."""
    if SWAP_AB:
        product = tl.dot(w, tl.trans(a))
    else:
        product = tl.dot(a, tl.trans(w))
    return product


@triton.jit
def outer(a_scale, w_scale, SWAP_AB: tl.constexpr):
    """The scale of each tile_dot element: a_scale [M] x w_scale [N], laid out as tile_dot's result."""
    if SWAP_AB:
        scale = w_scale[:, None] * a_scale[None, :]
    else:
        scale = a_scale[:, None] * w_scale[None, :]
    return scale


@triton.jit
def quantize_h_group(h_ptr, hq_ptr, hs_ptr, row, row_ok, group, N, stride_hm, stride_hqm, stride_hsm):
    """h[row, 128-column group] -> fp8 and its scale, with fp8_act_quant_kernel's arithmetic; h
    was written by other programs of the same launch, so it is read from L2 (.cg)."""
    cols = group * FP8_GROUP + tl.arange(0, FP8_GROUP)
    mask = row_ok[:, None] & (cols[None, :] < N)
    h = tl.load(h_ptr + row[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0,
                cache_modifier=".cg").to(tl.float32)
    store_quantized_groups(h, hq_ptr + row[:, None] * stride_hqm + cols[None, :], hs_ptr + row * stride_hsm + group,
                           mask, row_ok)


@triton.jit
def row_groups(row, K, ids_ptr, map_ptr, routed_rows, GROUPS: tl.constexpr, GROUP: tl.constexpr,
               ONLY_LOCAL_ROWS: tl.constexpr):
    """The 1x128 groups of one activation row that a program (axis 1: GROUPS consecutive groups)
    covers: (groups, cols, element mask, group mask). With ONLY_LOCAL_ROWS, rows of pairs routed
    to another rank's expert (never written by GEMM1) are masked out; rows past the routed pairs
    (the shared experts' tail) are always local."""
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    group_ok = groups * GROUP < K
    if ONLY_LOCAL_ROWS:
        routed = row < routed_rows
        expert = tl.load(ids_ptr + row, mask=routed, other=0)
        local = (tl.load(map_ptr + expert, mask=routed, other=0) >= 0) | (row >= routed_rows)
        mask = mask & local
        group_ok = group_ok & local
    return groups, cols, mask, group_ok


@triton.jit
def silu_mul(gate, up, h_ptr):
    """h = SiLU(gate) * up from fp32 gate and up, rounded once to h_ptr's (the model's) dtype: the one
    arithmetic of every path that makes h (GEMM1's epilogue, its last programs, gemm1_combine_kernel)."""
    return (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty)


@triton.jit
def store_quantized_groups(x, q_ptrs, scale_ptrs, mask, scale_mask):
    """fp32 x [n, 128], one quantisation group per row of the tile -> e4m3 at q_ptrs [n, 128] and
    the n group scales at scale_ptrs [n]."""
    scale = group_scale(tl.max(tl.abs(x), axis=1))
    tl.store(q_ptrs, quantize_with_scale(x, scale[:, None]), mask=mask)
    tl.store(scale_ptrs, scale, mask=scale_mask)


@triton.jit
def zero_block(ptr, base, numel, BLOCK: tl.constexpr):
    offs = base + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < numel)
