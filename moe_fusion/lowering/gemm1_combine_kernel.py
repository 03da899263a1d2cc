"""Finishes h after a K-split GEMM1: h[row] = SiLU(sum_s gate_s) * sum_s up_s, rounded to the
model dtype, from the fp32 sums each split wrote ([splits, rows, 2*I]: gate columns, then up).
For fp8 experts it quantises h per 1x128 group for GEMM2 in the same pass (the launch that
fp8_act_quant_kernel would otherwise be), so splitting GEMM1 adds no launch there.

Splitting GEMM1's K gives a single active expert more programs to stream its weights (at
dsv3-ep8 M = 1 swapped 64-row tiles leave only 32 otherwise). The splits are summed in a fixed
order: the result is the same on every run. With PDL (experts.EXPERT_PDL) it is a programmatic
dependent launch of GEMM1, placed while GEMM1 runs.
One program per (row, GROUPS consecutive 128-column groups), laid out by expert_tiles.row_groups.
Reference: reference.gated_mlp / reference._fp8_gated_mlp (SiLU*up, then the fp8 quantisation
of reference.quantize_fp8_groups).
"""
import triton
import triton.language as tl

from .expert_tiles import row_groups, silu_mul, store_quantized_groups
from .grid_sync import wait_then_release_dependents


@triton.jit
def gemm1_combine_kernel(
    sums_ptr, h_ptr, hq_ptr, hs_ptr, ids_ptr, map_ptr, routed_rows, N,
    stride_ss, stride_sm, stride_hm, stride_hqm, stride_hsm,
    SPLITS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, QUANT: tl.constexpr,
    ONLY_LOCAL_ROWS: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0)
    # Which rows are local comes from the routing, complete before GEMM1 started: with PDL this
    # lookup overlaps GEMM1's last wave, and only the sums' round trip follows it.
    groups, cols, mask, group_ok = row_groups(row, N, ids_ptr, map_ptr, routed_rows, GROUPS, GROUP, ONLY_LOCAL_ROWS)
    if PDL:
        wait_then_release_dependents()
    gate = tl.zeros((GROUPS, GROUP), tl.float32)
    up = tl.zeros((GROUPS, GROUP), tl.float32)
    # Unrolled, so that every split's loads are in flight at once: a loop over the splits waits a
    # memory round trip per split, and while the other stream's GEMM saturates HBM each round trip
    # costs ~1 us (H100, dsv3-ep8 M = 1: the shared expert's combine took 5.9 us rolled, 3.7 unrolled).
    for split in tl.static_range(SPLITS):
        sums = sums_ptr + split * stride_ss + row * stride_sm + cols
        gate += tl.load(sums, mask=mask, other=0.0)
        up += tl.load(sums + N, mask=mask, other=0.0)
    h = silu_mul(gate, up, h_ptr)
    if QUANT:
        store_quantized_groups(h.to(tl.float32), hq_ptr + row * stride_hqm + cols, hs_ptr + row * stride_hsm + groups,
                               mask, group_ok)
    else:
        tl.store(h_ptr + row * stride_hm + cols, h, mask=mask)
