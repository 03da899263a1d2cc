"""Expert GEMM2: out[token] += weight[pair] * (h[pair] @ Wd[e]^T) for every aligned pair.

One work item = (token tile, BLOCK_N slice of H, K split). The routing weight is applied and the
top-k reduction done in the epilogue:
  - atomic mode: fp32 atomic adds into out [M, H] (zeroed by GEMM1's launch); K splits and the
    top_k pairs of a token land in the same row, in whatever order the atomics arrive;
  - deterministic mode: plain stores of each (split, pair) row into y [SPLIT_K, num_pairs, H];
    moe_finalize_kernel then sums them in a fixed order.
Split-K gives small M*top_k enough work items for every SM to stream Wd. For fp8, h (model dtype)
is quantised per 1x128 group as it is loaded: a K block is one group, so this is exactly
reference.quantize_fp8_groups(h), without an fp8 copy of h in memory.
Reference: the last product of reference._fp8_gated_mlp / gated_mlp, times the routing weight,
summed over the top-k as in reference.routed_experts.
"""
import triton
import triton.language as tl

from .expert_tiles import A_MODEL_DTYPE, load_tile, prefetch_l2, quantize_group_fp8, token_tile


@triton.jit
def _prefetch_first_tile(item, n_blocks, items_per_tile, tile_expert_ptr, wd_ptr, N, K, k_per_split,
                         stride_we, stride_wn, stride_wk, BLOCK_N: tl.constexpr, PREFETCH_LINES: tl.constexpr):
    tile = item // items_per_tile
    rest = item - tile * items_per_tile
    split = rest // n_blocks
    n_block = rest - split * n_blocks
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    per_line = 128 // wd_ptr.dtype.element_ty.primitive_bitwidth * 8  # elements per 128-byte line
    k_start = split * k_per_split
    offs_k = k_start + tl.arange(0, PREFETCH_LINES) * per_line
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < tl.minimum(K, k_start + k_per_split))
    prefetch_l2(wd_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask)


@triton.jit
def expert_gemm2_kernel(
    h_ptr, pair_weight_ptr,
    wd_ptr, wd_scale_ptr,
    out_ptr,
    sorted_pair_ids_ptr, tile_expert_ptr, num_tiles_ptr,
    num_pairs, top_k, N, K, split_k, k_per_split,
    stride_hm, stride_hk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_out_split, stride_out_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_MODE: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    items_per_tile = n_blocks * split_k
    num_items = tl.load(num_tiles_ptr) * items_per_tile
    if USE_PDL:
        # Launched early (programmatic dependent launch) while GEMM1 still runs: the alignment
        # is already final, h and the accumulator are not. Pull this program's first Wd tile
        # into L2, then wait for GEMM1 to complete and its writes to be visible.
        if PREFETCH_LINES > 0:
            if pid < num_items:
                _prefetch_first_tile(pid, n_blocks, items_per_tile, tile_expert_ptr, wd_ptr, N, K, k_per_split,
                                     stride_we, stride_wn, stride_wk, BLOCK_N, PREFETCH_LINES)
        tl.extra.cuda.gdc_wait()
    for item in range(pid, num_items, num_programs):
        tile = item // items_per_tile
        rest = item - tile * items_per_tile
        split = rest // n_blocks
        n_block = rest - split * n_blocks
        expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
        pair, row_ok = token_tile(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_start = split * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + pair[:, None] * stride_hm + offs_k[None, :] * stride_hk
        w_ptrs = wd_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k_ok = offs_k < k_end
            a = load_tile(h_ptrs, row_ok, k_ok, False, EVEN_K)
            w = load_tile(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
            if A_MODE == A_MODEL_DTYPE:
                acc += tl.dot(a, tl.trans(w))
            else:
                k_group = k0 // BLOCK_K
                a_q, a_scale = quantize_group_fp8(a.to(tl.float32))
                s = tl.load(wd_scale_ptr + expert * stride_se + (offs_n // BLOCK_K) * stride_sn + k_group * stride_sk,
                            mask=n_ok, other=0.0)
                acc += tl.dot(a_q, tl.trans(w)) * (a_scale[:, None] * s[None, :])
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
            offs_k += BLOCK_K
        if APPLY_WEIGHT:
            acc *= tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
        mask = row_ok[:, None] & n_ok[None, :]
        if DETERMINISTIC:
            rows = split * stride_out_split + pair * stride_out_row
            tl.store(out_ptr + rows[:, None] + offs_n[None, :], acc, mask=mask)
        else:
            token = pair // top_k
            tl.atomic_add(out_ptr + token[:, None] * stride_out_row + offs_n[None, :], acc, mask=mask, sem="relaxed")
