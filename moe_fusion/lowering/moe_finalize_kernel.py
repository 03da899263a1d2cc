"""Deterministic top-k reduction: out[t] = sum over slots k, then K splits s, of y[s, t*top_k + k],
then over the N_SHARED shared experts' rows y[s, M*top_k + e*M + t] (expert_tiles.work_tile).

The partial rows come from expert_gemm2_kernel in deterministic mode (routing weight already
applied). The summation order is fixed, so the result is bitwise reproducible, unlike the atomic
epilogue. Pairs whose expert lives on another rank were never written: they are masked by the
expert map, not multiplied by zero, so whatever the buffer held cannot leak (NaN included).
Reference: the sum over the top-k in reference.routed_experts.
"""
import triton
import triton.language as tl


@triton.jit
def moe_finalize_kernel(
    y_ptr, out_ptr, topk_ids_ptr, expert_map_ptr,
    M, N,
    stride_y_split, stride_y_row, stride_out_row,
    TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_EXPERT_MAP: tl.constexpr, N_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        ok = n_ok
        if HAS_EXPERT_MAP:
            ok = ok & (tl.load(expert_map_ptr + tl.load(topk_ids_ptr + pair)) >= 0)
        for split in tl.static_range(SPLIT_K):
            acc += tl.load(y_ptr + split * stride_y_split + pair * stride_y_row + offs_n, mask=ok, other=0.0)
    for shared in tl.static_range(N_SHARED):
        row = M * TOP_K + shared * M + token
        for split in tl.static_range(SPLIT_K):
            acc += tl.load(y_ptr + split * stride_y_split + row * stride_y_row + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + token * stride_out_row + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
