"""Expert GEMM1: h[pair] = SiLU(x[token] @ Wg[e]^T) * (x[token] @ Wu[e]^T), for every
(token, expert) pair of the aligned token list (reference.align_pairs), in one launch.

One work item = one (token tile, BLOCK_N slice of I): gate and up of that slice are computed in
the same program, so x is read once for both and SiLU*up happens in registers; h is rounded to
the model dtype (as reference._fp8_gated_mlp does before re-quantising it). Work items are taken
by a persistent grid looping up to the real tile count, so no program is launched only to exit
when the static tile bound exceeds the real one. At decode the kernel is bound by streaming Wg and
Wu: BLOCK_N is chosen small when few experts are active, so every SM gets weight rows to read.

The same launch zeroes GEMM2's fp32 accumulator (``zero_ptr``), saving a memset launch.
Reference: reference.gated_mlp / reference._fp8_gated_mlp (the first two products and SiLU*up).
"""
import triton
import triton.language as tl

from .expert_tiles import A_FP8_GIVEN, A_MODEL_DTYPE, load_tile, quantize_group_fp8, token_tile


@triton.jit
def expert_gemm1_kernel(
    x_ptr, x_scale_ptr, pair_weight_ptr,
    wg_ptr, wu_ptr, wg_scale_ptr, wu_scale_ptr,
    h_ptr, zero_ptr,
    sorted_pair_ids_ptr, tile_expert_ptr, num_tiles_ptr,
    num_pairs, top_k, N, K, zero_numel,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_sge, stride_sgn, stride_sgk, stride_sue, stride_sun, stride_suk,
    stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_MODE: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    ZERO_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if USE_PDL:
        # GEMM2 may be scheduled now: its programs prefetch their Wd tiles into L2 and then wait
        # (griddepcontrol.wait) for this grid to finish, hiding its launch and ramp-up.
        tl.extra.cuda.gdc_launch_dependents()

    # GEMM2 accumulates into zero_ptr with atomics; zeroing it here saves a launch.
    for base in range(pid * ZERO_BLOCK, zero_numel, num_programs * ZERO_BLOCK):
        offs = base + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + offs, tl.zeros((ZERO_BLOCK,), tl.float32), mask=offs < zero_numel)

    n_blocks = tl.cdiv(N, BLOCK_N)
    num_items = tl.load(num_tiles_ptr) * n_blocks
    for item in range(pid, num_items, num_programs):
        tile = item // n_blocks
        n_block = item - tile * n_blocks
        expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
        pair, row_ok = token_tile(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
        token = pair // top_k
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
        wg_ptrs = wg_ptr + expert * stride_wge + offs_n[:, None] * stride_wgn + offs_k[None, :] * stride_wgk
        wu_ptrs = wu_ptr + expert * stride_wue + offs_n[:, None] * stride_wun + offs_k[None, :] * stride_wuk
        if WEIGHT_ON_INPUT:
            pair_weight = tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = load_tile(x_ptrs, row_ok, k_ok, False, EVEN_K)
            wg = load_tile(wg_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
            wu = load_tile(wu_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
            if WEIGHT_ON_INPUT:
                # The routing weight scales the expert's input, rounded as the reference does.
                a = (a.to(tl.float32) * pair_weight[:, None]).to(x_ptr.dtype.element_ty)
            if A_MODE == A_MODEL_DTYPE:
                acc_g += tl.dot(a, tl.trans(wg))
                acc_u += tl.dot(a, tl.trans(wu))
            else:
                k_group = k0 // BLOCK_K  # BLOCK_K is the 128-wide quantisation group
                if A_MODE == A_FP8_GIVEN:
                    a_scale = tl.load(x_scale_ptr + token * stride_xsm + k_group * stride_xsk, mask=row_ok, other=0.0)
                else:
                    a, a_scale = quantize_group_fp8(a.to(tl.float32))
                sg = tl.load(wg_scale_ptr + expert * stride_sge + (offs_n // BLOCK_K) * stride_sgn + k_group * stride_sgk,
                             mask=n_ok, other=0.0)
                su = tl.load(wu_scale_ptr + expert * stride_sue + (offs_n // BLOCK_K) * stride_sun + k_group * stride_suk,
                             mask=n_ok, other=0.0)
                acc_g += tl.dot(a, tl.trans(wg)) * (a_scale[:, None] * sg[None, :])
                acc_u += tl.dot(a, tl.trans(wu)) * (a_scale[:, None] * su[None, :])
            x_ptrs += BLOCK_K * stride_xk
            wg_ptrs += BLOCK_K * stride_wgk
            wu_ptrs += BLOCK_K * stride_wuk
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        h_ptrs = h_ptr + pair[:, None] * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
