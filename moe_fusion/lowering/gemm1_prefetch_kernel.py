"""Warm L2 with the start of GEMM1's weight stream before GEMM1's input exists.

For a launch whose alignment is a constant (the shared expert run on the expert kernels: every
token selects it, experts.dense_routing), which Wg and Wu rows each GEMM1 program reads first is
known before the norm has made GEMM1's input. Launched beside the norm (layer.py forks it to the
side stream before the preamble), this kernel asks L2 for the first PREFETCH_LINES 128-byte
lines of every row of each item in GEMM1's first wave (item = program id, the persistent grid's
first pass). HBM, otherwise idle while the norm runs, streams those lines; GEMM1, which must wait
for the norm, then finds its first K steps in L2. The prefetches are hints: no result depends on
them. CUDA only (inline PTX); nothing launches it elsewhere.
"""
import triton
import triton.language as tl

from .expert_tiles import prefetch_item_rows


@triton.jit
def gemm1_prefetch_kernel(
    wg_ptr, wu_ptr, tile_expert_ptr, num_tiles_ptr, N, K, k_per_split, n_blocks, items_per_tile,
    stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    BLOCK_N: tl.constexpr, PREFETCH_LINES: tl.constexpr,
):
    """Grid: GEMM1's first wave, one program per item (experts.prefetch_gemm1_weights)."""
    item = tl.program_id(0)
    if item < tl.load(num_tiles_ptr) * items_per_tile:
        prefetch_item_rows(item, n_blocks, items_per_tile, tile_expert_ptr, wg_ptr, N, K, k_per_split,
                           stride_wge, stride_wgn, stride_wgk, BLOCK_N, PREFETCH_LINES)
        prefetch_item_rows(item, n_blocks, items_per_tile, tile_expert_ptr, wu_ptr, N, K, k_per_split,
                           stride_wue, stride_wun, stride_wuk, BLOCK_N, PREFETCH_LINES)
