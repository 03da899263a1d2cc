"""Expert GEMM1: h[row] = SiLU(x[token] @ Wg[e]^T) * (x[token] @ Wu[e]^T), for every
(token, expert) pair of the aligned token list (reference.align_pairs), in one launch.

One work item = one (token tile, BLOCK_N slice of I): gate and up of that slice are computed in
the same program, so x is read once for both and SiLU*up happens in registers; h is rounded to
the model dtype (as reference._fp8_gated_mlp does before re-quantising it; for fp8 experts
fp8_act_quant_kernel then quantises h for GEMM2). Work items are taken
by a persistent grid looping up to the real tile count, so no program is launched only to exit
when the static tile bound exceeds the real one. At decode the kernel is bound by streaming Wg and
Wu: BLOCK_N is chosen small when few experts are active, so every SM gets weight rows to read.

Shared experts (N_SHARED > 0, the layer's "fused" strategy): N_SHARED extra experts that every
token selects follow the routed tiles as a dense tail (expert_tiles.work_tile); their weights
are separate tensors (sw*), their h rows follow the routed pairs. With a sigmoid shared-expert
gate the programs of shared expert 0 also write the gate logit's partial dots, one per K block
(gate_partial [K blocks, M]), which GEMM2 sums in a fixed order: no extra launch, no atomics.

fp8 with QUANT_H (experts.FUSED_H_QUANT, off by default: measured slower at M <= 2): GEMM1 also
quantises h for GEMM2, saving the fp8_act_quant_kernel launch between
the GEMMs. The programs of one (tile, 128-column group) each store their h slice and draw a ticket
(an atomic counter per group); the one that draws the last ticket reads the whole group back and
writes fp8 h and its scale with the arithmetic of fp8_act_quant_kernel (bitwise the same), then
resets the counter to zero for the next launch (the counters live in a persistent zeroed buffer,
experts._ticket_buffer).

Split over K (split_k > 1, SPLIT_OUT): items are (tile, K split, BLOCK_N slice) and write fp32 gate
and up sums per split; gemm1_combine_kernel sums them and applies SiLU*up. With swapped operands
(SWAP_AB) the tiles are weights . tokens^T, transposed once before the epilogue.

The same launch zeroes GEMM2's fp32 accumulator (``zero_ptr``), saving a memset launch.
Reference: reference.gated_mlp / reference._fp8_gated_mlp (the first two products and SiLU*up).
"""
import triton
import triton.language as tl

from .expert_tiles import (A_MODEL_DTYPE, FP8_GROUP, load_tile, outer, quantize_h_group, routed_tiles, silu_mul,
                           tile_dot, work_tile, zero_block)


@triton.jit
def _gate_partials(gx_ptr, gw_ptr, partial_ptr, token, row_ok, n_block, n_blocks, M, K, stride_gxm, stride_gxk,
                   BLOCK_K: tl.constexpr):
    """partial[part, token] = x[token, part's K block] . shared_expert_gate[that block], the parts
    dealt round-robin over the programs of one token tile."""
    offs_k = tl.arange(0, BLOCK_K)
    for part in range(n_block, tl.cdiv(K, BLOCK_K), n_blocks):
        k = part * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(gx_ptr + token[:, None] * stride_gxm + k[None, :] * stride_gxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(gw_ptr + k, mask=k_ok, other=0.0)
        tl.store(partial_ptr + part * M + token, tl.sum(x.to(tl.float32) * g.to(tl.float32)[None, :], axis=1),
                 mask=row_ok)


@triton.jit
def _quantize_group_if_last(h_ptr, hq_ptr, hs_ptr, ticket_ptr, tile, n_block, row, row_ok, N,
                            stride_hm, stride_hqm, stride_hsm, BLOCK_N: tl.constexpr):
    """Called by every program after storing its h slice; the last one of its 128-column group
    quantises the group (fp8_act_quant_kernel's arithmetic) and re-arms the group's counter."""
    group = n_block * BLOCK_N // FP8_GROUP
    slot = tile * tl.cdiv(N, FP8_GROUP) + group
    slices = tl.cdiv(tl.minimum(FP8_GROUP, N - group * FP8_GROUP), BLOCK_N)
    # Every thread's h stores are issued before the one release below that publishes them.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + slot, 1, sem="acq_rel") == slices - 1:
        quantize_h_group(h_ptr, hq_ptr, hs_ptr, row, row_ok, group, N, stride_hm, stride_hqm, stride_hsm)
        tl.store(ticket_ptr + slot, 0)


@triton.jit
def gemm1_item(
    item, n_blocks, num_routed, m_tiles, split_k, k_per_split, partial_ptr, stride_ps, stride_pm,
    x_ptr, x_scale_ptr, pair_weight_ptr,
    wg_ptr, wu_ptr, wg_scale_ptr, wu_scale_ptr,
    swg_ptr, swu_ptr, swg_scale_ptr, swu_scale_ptr,
    gx_ptr, gw_ptr, gate_partial_ptr,
    h_ptr, hq_ptr, hs_ptr, ticket_ptr,
    sorted_pair_ids_ptr, tile_expert_ptr,
    num_pairs, top_k, M, N, K,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_sge, stride_sgn, stride_sgk, stride_sue, stride_sun, stride_suk,
    stride_swge, stride_swgn, stride_swgk, stride_swue, stride_swun, stride_swuk,
    stride_ssge, stride_ssgn, stride_ssgk, stride_ssue, stride_ssun, stride_ssuk,
    stride_gxm, stride_gxk, stride_hm, stride_hqm, stride_hsm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, SWAP_AB: tl.constexpr,
    A_MODE: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    N_SHARED: tl.constexpr, SHARED_GATE: tl.constexpr, QUANT_H: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_OUT: tl.constexpr, DENSE_ALIGNMENT: tl.constexpr,
):
    """One work item: the h slice of one (token tile, BLOCK_N columns), or with SPLIT_OUT the fp32
    gate and up sums of one K split of it (gemm1_combine_kernel finishes h)."""
    # The same order as expert_tiles.split_item, written out: through the helper the compiled
    # kernel differs (registers) from the one measured on the H100.
    tile = item // (n_blocks * split_k)
    rest = item - tile * n_blocks * split_k
    split = rest // n_blocks
    n_block = rest - split * n_blocks
    expert, row, token, row_ok, shared = work_tile(tile, num_routed, m_tiles, tile_expert_ptr, sorted_pair_ids_ptr,
                                                   num_pairs, top_k, M, BLOCK_M, N_SHARED, DENSE_ALIGNMENT)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, SUB_K)
    x_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Routed and shared experts live in different tensors: pick the base and strides per tile.
    if shared:
        wg_ptrs = swg_ptr + expert * stride_swge + offs_n[:, None] * stride_swgn + offs_k[None, :] * stride_swgk
        wu_ptrs = swu_ptr + expert * stride_swue + offs_n[:, None] * stride_swun + offs_k[None, :] * stride_swuk
        sg_ptrs = swg_scale_ptr + expert * stride_ssge + (offs_n // FP8_GROUP) * stride_ssgn
        su_ptrs = swu_scale_ptr + expert * stride_ssue + (offs_n // FP8_GROUP) * stride_ssun
        kstride_g, kstride_u = stride_swgk, stride_swuk
        step_sg, step_su = stride_ssgk, stride_ssuk
    else:
        wg_ptrs = wg_ptr + expert * stride_wge + offs_n[:, None] * stride_wgn + offs_k[None, :] * stride_wgk
        wu_ptrs = wu_ptr + expert * stride_wue + offs_n[:, None] * stride_wun + offs_k[None, :] * stride_wuk
        sg_ptrs = wg_scale_ptr + expert * stride_sge + (offs_n // FP8_GROUP) * stride_sgn
        su_ptrs = wu_scale_ptr + expert * stride_sue + (offs_n // FP8_GROUP) * stride_sun
        kstride_g, kstride_u = stride_wgk, stride_wuk
        step_sg, step_su = stride_sgk, stride_suk
    if WEIGHT_ON_INPUT:
        pair_weight = tl.load(pair_weight_ptr + row, mask=row_ok, other=0.0)
    acc_g = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        # fp8: one dot per 128-wide scale group; a K step may hold several (the tuner decides).
        for sub in tl.static_range(BLOCK_K // SUB_K):
            k_sub = k0 + sub * SUB_K
            k_ok = offs_k < k_end - k_sub
            a = load_tile(x_ptrs + k_sub * stride_xk, row_ok, k_ok, False, EVEN_K)
            wg = load_tile(wg_ptrs + k_sub * kstride_g, n_ok, k_ok, EVEN_N, EVEN_K)
            wu = load_tile(wu_ptrs + k_sub * kstride_u, n_ok, k_ok, EVEN_N, EVEN_K)
            if WEIGHT_ON_INPUT:
                # The routing weight scales the expert's input, rounded as the reference does.
                a = (a.to(tl.float32) * pair_weight[:, None]).to(x_ptr.dtype.element_ty)
            if A_MODE == A_MODEL_DTYPE:
                acc_g += tile_dot(a, wg, SWAP_AB)
                acc_u += tile_dot(a, wu, SWAP_AB)
            else:
                k_group = k_sub // FP8_GROUP
                in_k = k_sub < k_end
                a_scale = tl.load(x_scale_ptr + token * stride_xsm + k_group * stride_xsk, mask=row_ok & in_k,
                                  other=0.0)
                sg = tl.load(sg_ptrs + k_group * step_sg, mask=n_ok & in_k, other=0.0)
                su = tl.load(su_ptrs + k_group * step_su, mask=n_ok & in_k, other=0.0)
                acc_g += tile_dot(a, wg, SWAP_AB) * outer(a_scale, sg, SWAP_AB)
                acc_u += tile_dot(a, wu, SWAP_AB) * outer(a_scale, su, SWAP_AB)
    if SWAP_AB:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT_OUT:
        sums = partial_ptr + split * stride_ps + row[:, None] * stride_pm + offs_n[None, :]
        tl.store(sums, acc_g, mask=mask)
        tl.store(sums + N, acc_u, mask=mask)
    else:
        h = silu_mul(acc_g, acc_u, h_ptr)
        tl.store(h_ptr + row[:, None] * stride_hm + offs_n[None, :], h, mask=mask)
        if QUANT_H:
            _quantize_group_if_last(h_ptr, hq_ptr, hs_ptr, ticket_ptr, tile, n_block, row, row_ok, N,
                                    stride_hm, stride_hqm, stride_hsm, BLOCK_N)
    if SHARED_GATE:
        if shared:
            if expert == 0:
                if split == 0:
                    _gate_partials(gx_ptr, gw_ptr, gate_partial_ptr, token, row_ok, n_block, n_blocks, M, K,
                                   stride_gxm, stride_gxk, BLOCK_K)


@triton.jit
def expert_gemm1_kernel(
    x_ptr, x_scale_ptr, pair_weight_ptr,
    wg_ptr, wu_ptr, wg_scale_ptr, wu_scale_ptr,
    swg_ptr, swu_ptr, swg_scale_ptr, swu_scale_ptr,
    gx_ptr, gw_ptr, gate_partial_ptr,
    h_ptr, hq_ptr, hs_ptr,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_sge, stride_sgn, stride_sgk, stride_sue, stride_sun, stride_suk,
    stride_swge, stride_swgn, stride_swgk, stride_swue, stride_swun, stride_swuk,
    stride_ssge, stride_ssgn, stride_ssgk, stride_ssue, stride_ssun, stride_ssuk,
    stride_gxm, stride_gxk, stride_hm, stride_hqm, stride_hsm,
    zero_ptr, ticket_ptr, partial_ptr, stride_ps, stride_pm, split_k, k_per_split,
    sorted_pair_ids_ptr, tile_expert_ptr, num_tiles_ptr,
    num_pairs, top_k, M, N, K, zero_numel,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, SWAP_AB: tl.constexpr,
    A_MODE: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    N_SHARED: tl.constexpr, SHARED_GATE: tl.constexpr, QUANT_H: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_OUT: tl.constexpr, DENSE_ALIGNMENT: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if LAUNCH_DEPENDENTS:
        # The launch that prepares h (a programmatic dependent, experts.EXPERT_PDL) may be placed
        # now; it waits (griddepcontrol.wait) for this grid to finish before reading h.
        tl.extra.cuda.gdc_launch_dependents()

    # GEMM2 accumulates into zero_ptr with atomics; zeroing it here saves a launch.
    for base in range(pid * ZERO_BLOCK, zero_numel, num_programs * ZERO_BLOCK):
        zero_block(zero_ptr, base, zero_numel, ZERO_BLOCK)

    n_blocks = tl.cdiv(N, BLOCK_N)
    m_tiles = tl.cdiv(M, BLOCK_M)
    num_routed = routed_tiles(num_tiles_ptr, top_k, m_tiles, DENSE_ALIGNMENT)
    num_items = (num_routed + N_SHARED * m_tiles) * n_blocks * split_k
    for item in range(pid, num_items, num_programs):
        gemm1_item(
            item, n_blocks, num_routed, m_tiles, split_k, k_per_split, partial_ptr, stride_ps, stride_pm,
            x_ptr, x_scale_ptr, pair_weight_ptr, wg_ptr, wu_ptr, wg_scale_ptr, wu_scale_ptr,
            swg_ptr, swu_ptr, swg_scale_ptr, swu_scale_ptr, gx_ptr, gw_ptr, gate_partial_ptr,
            h_ptr, hq_ptr, hs_ptr, ticket_ptr, sorted_pair_ids_ptr, tile_expert_ptr,
            num_pairs, top_k, M, N, K,
            stride_xm, stride_xk, stride_xsm, stride_xsk,
            stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
            stride_sge, stride_sgn, stride_sgk, stride_sue, stride_sun, stride_suk,
            stride_swge, stride_swgn, stride_swgk, stride_swue, stride_swun, stride_swuk,
            stride_ssge, stride_ssgn, stride_ssgk, stride_ssue, stride_ssun, stride_ssuk,
            stride_gxm, stride_gxk, stride_hm, stride_hqm, stride_hsm,
            BLOCK_M, BLOCK_N, BLOCK_K, SUB_K, SWAP_AB, A_MODE, WEIGHT_ON_INPUT, N_SHARED, SHARED_GATE, QUANT_H,
            EVEN_N, EVEN_K, SPLIT_OUT, DENSE_ALIGNMENT,
        )
