"""One-time e4m3 block quantisation of expert weights: w [E, N, K] (any strides, bf16/fp16/fp32)
-> q [E, N, K] contiguous e4m3 and scale [E, ceil(N/128), ceil(K/128)] fp32.

One program per 128x128 block: amax, scale = max(amax / 448, 1e-10), q = clamp(w / scale) cast
with round-to-nearest; IEEE divisions, so the result is bitwise reference.quantize_fp8_blocks.
Used when the user asks for fp8 experts on a bf16 model (experts.quantize_expert_weights_fp8).
"""
import triton
import triton.language as tl

from .expert_tiles import FP8_MAX, FP8_MIN_SCALE, to_e4m3


@triton.jit
def fp8_weight_quant_kernel(
    w_ptr, q_ptr, scale_ptr,
    N, K, n_blocks, k_blocks,
    stride_we, stride_wn, stride_wk,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    expert = block // (n_blocks * k_blocks)
    rest = block - expert * (n_blocks * k_blocks)
    nb = rest // k_blocks
    kb = rest - nb * k_blocks
    offs_n = nb * BLOCK + tl.arange(0, BLOCK)
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    e64 = expert.to(tl.int64)
    w = tl.load(w_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), FP8_MIN_SCALE)
    q = tl.minimum(tl.maximum(tl.math.div_rn(w, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + e64 * N * K + offs_n[:, None] * K + offs_k[None, :], to_e4m3(q), mask=mask)
    tl.store(scale_ptr + block, scale)
