"""Expert GEMM2: out[token] += weight[pair] * (h[pair] @ Wd[e]^T) for every aligned pair.

One work item = (token tile, BLOCK_N slice of H, K split). The routing weight is applied and the
top-k reduction done in the epilogue:
  - atomic mode: fp32 atomic adds into out [M, H] (zeroed by GEMM1's launch); K splits and the
    top_k pairs of a token land in the same row, in whatever order the atomics arrive;
  - deterministic mode: plain stores of each (split, pair) row into y [SPLIT_K, num_pairs, H];
    moe_finalize_kernel then sums them in a fixed order.
Split-K gives small M*top_k enough work items for every SM to stream Wd. For fp8, A is h quantised
per 1x128 group by fp8_act_quant_kernel (bitwise reference.quantize_fp8_groups(h)); a K step holds
whole groups, each one fp8 dot multiplied by its activation and weight scales.
Shared experts (N_SHARED > 0): the dense tail of expert_tiles.work_tile, with separate weight
tensors (swd); their weight is 1, or with SHARED_GATE sigmoid of the gate logit, summed here from
GEMM1's per-K-block partial dots in a fixed order and rounded like the reference's bf16 linear and
sigmoid.
Reference: the last product of reference._fp8_gated_mlp / gated_mlp, times the routing weight,
summed over the top-k as in reference.routed_experts (shared experts: reference.shared_experts).
"""
import triton
import triton.language as tl

from .expert_tiles import A_MODEL_DTYPE, FP8_GROUP, load_tile, outer, routed_tiles, split_item, tile_dot, work_tile


@triton.jit
def _shared_gate(partial_ptr, token, row_ok, M, GATE_PARTS: tl.constexpr, n_parts, MODEL_DTYPE: tl.constexpr):
    """sigmoid(x . shared_expert_gate) per token from GEMM1's partial dots, rounded to the model
    dtype after the dot and after the sigmoid, as the reference's model-dtype linear and sigmoid."""
    parts = tl.arange(0, GATE_PARTS)
    p = tl.load(partial_ptr + parts[None, :] * M + token[:, None], mask=row_ok[:, None] & (parts[None, :] < n_parts),
                other=0.0)
    logit = tl.sum(p, axis=1).to(MODEL_DTYPE).to(tl.float32)
    return tl.sigmoid(logit).to(MODEL_DTYPE).to(tl.float32)


@triton.jit
def gemm2_item(
    item, n_blocks, items_per_tile, num_routed, m_tiles,
    h_ptr, h_scale_ptr, pair_weight_ptr,
    wd_ptr, wd_scale_ptr, swd_ptr, swd_scale_ptr, gate_partial_ptr,
    out_ptr,
    sorted_pair_ids_ptr, tile_expert_ptr,
    num_pairs, top_k, M, N, K, k_per_split, gate_parts,
    stride_hm, stride_hk, stride_hsm, stride_hsk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_swe, stride_swn, stride_swk,
    stride_sse, stride_ssn, stride_ssk,
    stride_out_split, stride_out_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, SWAP_AB: tl.constexpr,
    A_MODE: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    N_SHARED: tl.constexpr, SHARED_GATE: tl.constexpr, GATE_PARTS: tl.constexpr, MODEL_DTYPE: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DENSE_ALIGNMENT: tl.constexpr,
):
    """One work item: (token tile, BLOCK_N columns of H, K split), weighted and accumulated."""
    tile, split, n_block = split_item(item, n_blocks, items_per_tile)
    expert, row, token, row_ok, shared = work_tile(tile, num_routed, m_tiles, tile_expert_ptr, sorted_pair_ids_ptr,
                                                   num_pairs, top_k, M, BLOCK_M, N_SHARED, DENSE_ALIGNMENT)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_k = tl.arange(0, SUB_K)
    h_ptrs = h_ptr + row[:, None] * stride_hm + offs_k[None, :] * stride_hk
    # Routed and shared experts live in different tensors: pick the base and strides per tile.
    if shared:
        w_ptrs = swd_ptr + expert * stride_swe + offs_n[:, None] * stride_swn + offs_k[None, :] * stride_swk
        s_ptrs = swd_scale_ptr + expert * stride_sse + (offs_n // FP8_GROUP) * stride_ssn
        kstride_w, stride_s_k = stride_swk, stride_ssk
    else:
        w_ptrs = wd_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        s_ptrs = wd_scale_ptr + expert * stride_se + (offs_n // FP8_GROUP) * stride_sn
        kstride_w, stride_s_k = stride_wk, stride_sk
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // SUB_K):  # fp8: one dot per 128-wide scale group
            k_sub = k0 + sub * SUB_K
            k_ok = offs_k < k_end - k_sub
            a = load_tile(h_ptrs + k_sub * stride_hk, row_ok, k_ok, False, EVEN_K)
            w = load_tile(w_ptrs + k_sub * kstride_w, n_ok, k_ok, EVEN_N, EVEN_K)
            if A_MODE == A_MODEL_DTYPE:
                acc += tile_dot(a, w, SWAP_AB)
            else:
                k_group = k_sub // FP8_GROUP
                in_k = k_sub < k_end
                a_scale = tl.load(h_scale_ptr + row * stride_hsm + k_group * stride_hsk, mask=row_ok & in_k, other=0.0)
                s = tl.load(s_ptrs + k_group * stride_s_k, mask=n_ok & in_k, other=0.0)
                acc += tile_dot(a, w, SWAP_AB) * outer(a_scale, s, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
    if APPLY_WEIGHT:
        if shared:
            if SHARED_GATE:
                acc *= _shared_gate(gate_partial_ptr, token, row_ok, M, GATE_PARTS, gate_parts, MODEL_DTYPE)[:, None]
        else:
            acc *= tl.load(pair_weight_ptr + row, mask=row_ok, other=0.0)[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    if DETERMINISTIC:
        rows = split * stride_out_split + row * stride_out_row
        tl.store(out_ptr + rows[:, None] + offs_n[None, :], acc, mask=mask)
    else:
        tl.atomic_add(out_ptr + token[:, None] * stride_out_row + offs_n[None, :], acc, mask=mask, sem="relaxed")


@triton.jit
def expert_gemm2_kernel(
    h_ptr, h_scale_ptr, pair_weight_ptr, gate_partial_ptr,
    stride_hm, stride_hk, stride_hsm, stride_hsk,
    wd_ptr, wd_scale_ptr, swd_ptr, swd_scale_ptr, out_ptr,
    split_k, k_per_split, gate_parts,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_swe, stride_swn, stride_swk,
    stride_sse, stride_ssn, stride_ssk,
    stride_out_split, stride_out_row,
    sorted_pair_ids_ptr, tile_expert_ptr, num_tiles_ptr,
    num_pairs, top_k, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, SWAP_AB: tl.constexpr,
    A_MODE: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    N_SHARED: tl.constexpr, SHARED_GATE: tl.constexpr, GATE_PARTS: tl.constexpr, MODEL_DTYPE: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DENSE_ALIGNMENT: tl.constexpr,
    USE_PDL: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if LAUNCH_DEPENDENTS:
        # The layer's output launch (layer_output_kernel, a programmatic dependent) may be placed
        # now: a few programs that wait for this grid to finish.
        tl.extra.cuda.gdc_launch_dependents()
    n_blocks = tl.cdiv(N, BLOCK_N)
    items_per_tile = n_blocks * split_k
    m_tiles = tl.cdiv(M, BLOCK_M)
    num_routed = routed_tiles(num_tiles_ptr, top_k, m_tiles, DENSE_ALIGNMENT)
    num_items = (num_routed + N_SHARED * m_tiles) * items_per_tile
    if USE_PDL:
        # A programmatic dependent of the launch that prepares h, placed once GEMM1 has finished
        # (experts.EXPERT_PDL): the alignment is final, h is not. Wait for h to be complete and visible.
        tl.extra.cuda.gdc_wait()
    for item in range(pid, num_items, num_programs):
        gemm2_item(
            item, n_blocks, items_per_tile, num_routed, m_tiles,
            h_ptr, h_scale_ptr, pair_weight_ptr, wd_ptr, wd_scale_ptr, swd_ptr, swd_scale_ptr, gate_partial_ptr,
            out_ptr, sorted_pair_ids_ptr, tile_expert_ptr,
            num_pairs, top_k, M, N, K, k_per_split, gate_parts,
            stride_hm, stride_hk, stride_hsm, stride_hsk,
            stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
            stride_swe, stride_swn, stride_swk, stride_sse, stride_ssn, stride_ssk,
            stride_out_split, stride_out_row,
            BLOCK_M, BLOCK_N, BLOCK_K, SUB_K, SWAP_AB, A_MODE, APPLY_WEIGHT, DETERMINISTIC,
            N_SHARED, SHARED_GATE, GATE_PARTS, MODEL_DTYPE, EVEN_N, EVEN_K, DENSE_ALIGNMENT,
        )
