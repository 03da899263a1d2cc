"""A dense fp8 gated MLP for a few tokens in one launch of one wave: the shared expert at decode.

At dsv3-ep8 M = 1 half the calls hit no local expert, and the layer is then the shared expert's
chain: GEMM1 streams 29 MB, a launch makes h, GEMM2 streams 15 MB, each a single wave with its own
start (benchmarks/results/session24.md). Here both weight matrices are one stream: every program
asks for its share of W_down (into registers) before it streams its share of W_gate / W_up, so
W_down arrives while GEMM1 runs, and once h is made only the products are left.

Program (g, s), g < Is/128 (h's quantisation groups), s < SPLITS:
- GEMM1: the gate and up rows of group g over K range s (H / SPLITS columns), fp32 sums to ``sums``;
- it meets the SPLITS programs of group g at a counter; each then sums their partial sums in a
  fixed order (the same bits in each), makes h = SiLU(gate) * up rounded to the model dtype and
  quantises it per 1x128 group, with gemm1_combine_kernel's arithmetic;
- GEMM2: W_down rows of range s times group g's 128 columns of h, into ``out[g]``. The shared
  expert's output is the sum of the Is/128 partial outputs (layer_output_kernel adds them).

Waiting inside a launch is safe only while every program of a group is resident: the host launches
no more programs than SMs, and the W_down registers keep a second program off an SM. The counters
are never re-armed: the arrivals of one launch at a counter add up to exactly 2^16, so between
launches every counter is a multiple of 2^16 and "all arrived" is "counter mod 2^16 = 0". The Triton
interpreter runs programs one after another, so there GEMM1 (PHASE 1) and the rest (PHASE 2) are two
launches of the same code.
Reference: reference.shared_experts_fp8.
"""
import triton
import triton.language as tl

from .expert_tiles import FP8_GROUP, group_scale, quantize_with_scale, silu_mul

BOTH_PHASES = tl.constexpr(0)
GEMM1_PHASE = tl.constexpr(1)
REST_PHASE = tl.constexpr(2)
ARRIVALS = tl.constexpr(1 << 16)  # what the arrivals of one launch add to a group's counter


@triton.jit
def _gemm1_sums(xq_ptr, xs_ptr, wg_ptr, wu_ptr, wgs_ptr, wus_ptr, group, split, tokens, token_ok,
                stride_xm, stride_xsm, stride_wn, stride_wsn, K_RANGE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Group ``group``'s gate and up sums over K range ``split``, [BLOCK_M, 128] each (swapped dots:
    the 128 weight rows fill the MMA's M side)."""
    rows = group * FP8_GROUP + tl.arange(0, FP8_GROUP)
    gate = tl.zeros((FP8_GROUP, BLOCK_M), tl.float32)
    up = tl.zeros((FP8_GROUP, BLOCK_M), tl.float32)
    k_start = split * K_RANGE
    for k in tl.range(k_start, k_start + K_RANGE, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        x = tl.load(xq_ptr + tokens[:, None] * stride_xm + cols[None, :], mask=token_ok[:, None], other=0.0)
        x_scale = tl.load(xs_ptr + tokens * stride_xsm + k // FP8_GROUP, mask=token_ok, other=0.0)
        w_offs = rows[:, None] * stride_wn + cols[None, :]
        scale_offs = group * stride_wsn + k // FP8_GROUP
        gate += tl.dot(tl.load(wg_ptr + w_offs), tl.trans(x)) * (tl.load(wgs_ptr + scale_offs) * x_scale)[None, :]
        up += tl.dot(tl.load(wu_ptr + w_offs), tl.trans(x)) * (tl.load(wus_ptr + scale_offs) * x_scale)[None, :]
    return tl.trans(gate), tl.trans(up)


@triton.jit
def _meet(counter_ptr, split, SPLITS: tl.constexpr):
    """Arrive at the group's counter (after this program's sums are stored), then wait for the rest."""
    share = ARRIVALS // SPLITS
    if split == SPLITS - 1:
        share = ARRIVALS - (SPLITS - 1) * (ARRIVALS // SPLITS)
    tl.debug_barrier()
    seen = tl.atomic_add(counter_ptr, share, sem="release") + share
    while seen % ARRIVALS != 0:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")


@triton.jit
def one_wave_mlp_kernel(
    xq_ptr, xs_ptr, wg_ptr, wu_ptr, wgs_ptr, wus_ptr, wd_ptr, wds_ptr, sums_ptr, counter_ptr, out_ptr, model_ptr,
    M, H, groups_per_chunk,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_wde, stride_wdn, stride_wdse, stride_wdsn, stride_og,
    stride_om,
    SPLITS: tl.constexpr, K_RANGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PHASE: tl.constexpr,
):
    pid = tl.program_id(0)
    group = pid // SPLITS
    split = pid - group * SPLITS
    tokens = tl.arange(0, BLOCK_M)
    token_ok = tokens < M
    down_rows = split * K_RANGE + tl.arange(0, K_RANGE)
    if PHASE != GEMM1_PHASE:
        # First, so that this program's W_down streams beside GEMM1's weights. W_down is [chunks, H, I]
        # (a shared MLP of width n*I is n experts of width I: experts.SharedTail).
        chunk = group // groups_per_chunk
        chunk_group = group - chunk * groups_per_chunk
        h_cols = chunk_group * FP8_GROUP + tl.arange(0, FP8_GROUP)
        w_down = tl.load(wd_ptr + chunk * stride_wde + down_rows[:, None] * stride_wdn + h_cols[None, :])
        down_scale = tl.load(wds_ptr + chunk * stride_wdse + (down_rows // FP8_GROUP) * stride_wdsn + chunk_group)
    # sums [groups, SPLITS, M, gate | up, 128]
    own = sums_ptr + ((group * SPLITS + split) * M + tokens[:, None]) * (2 * FP8_GROUP) \
        + tl.arange(0, FP8_GROUP)[None, :]
    if PHASE != REST_PHASE:
        gate, up = _gemm1_sums(xq_ptr, xs_ptr, wg_ptr, wu_ptr, wgs_ptr, wus_ptr, group, split, tokens, token_ok,
                               stride_xm, stride_xsm, stride_wn, stride_wsn, K_RANGE, BLOCK_M, BLOCK_K)
        tl.store(own, gate, mask=token_ok[:, None])
        tl.store(own + FP8_GROUP, up, mask=token_ok[:, None])
    if PHASE == BOTH_PHASES:
        _meet(counter_ptr + group, split, SPLITS)
    if PHASE != GEMM1_PHASE:
        gate = tl.zeros((BLOCK_M, FP8_GROUP), tl.float32)
        up = tl.zeros((BLOCK_M, FP8_GROUP), tl.float32)
        for s in tl.static_range(SPLITS):  # unrolled: every split's loads in flight at once
            sums = own + (s - split) * (M * 2 * FP8_GROUP)
            gate += tl.load(sums, mask=token_ok[:, None], other=0.0, cache_modifier=".cg")
            up += tl.load(sums + FP8_GROUP, mask=token_ok[:, None], other=0.0, cache_modifier=".cg")
        h = silu_mul(gate, up, model_ptr).to(tl.float32)
        h_scale = group_scale(tl.max(tl.abs(h), axis=1))
        h_fp8 = quantize_with_scale(h, h_scale[:, None])
        y = tl.dot(w_down, tl.trans(h_fp8)) * (down_scale[:, None] * h_scale[None, :])  # [K_RANGE, BLOCK_M]
        tl.store(out_ptr + group * stride_og + tokens[None, :] * stride_om + down_rows[:, None], y,
                 mask=token_ok[None, :])
