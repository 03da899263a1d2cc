"""Per-row 1x128-group e4m3 quantisation of activations: x [M, K] -> (q [R, K], scale [R, ceil(K/128)]).

Used for x (when the preamble did not quantise it) and for h between the two expert GEMMs.
Rows are tokens (R = M), or (token, slot) pairs when the routing weight scales the expert input
(weight_on == "input"): then row p is x[p // top_k] * weight[p], rounded to the model dtype first,
as reference.routed_experts does. One program per (row, GROUPS consecutive groups).
With expert parallelism, h rows of pairs routed to another rank's expert were never written by
GEMM1 (and GEMM2 never reads them): ``expert_map`` masks those rows out instead of reading them.
Reference: reference.quantize_fp8_groups (bitwise on the same device).
"""
import triton
import triton.language as tl

from .expert_tiles import row_groups, store_quantized_groups
from .grid_sync import wait_then_release_dependents

# How a launch of this kernel is a programmatic dependent of the launch before it (PDL):
PDL_OFF = tl.constexpr(0)  # a plain launch
# h after GEMM1: wait for the launch before (it writes what this one reads), then release the next.
PDL_READS_PREVIOUS = tl.constexpr(1)
# x beside the alignment, which reads nothing this launch writes and writes nothing it reads: run
# alongside it and wait for it only at the end, so that this launch's completion still implies the
# alignment's (the plain launch after this one, GEMM1, reads both).
PDL_BESIDE_PREVIOUS = tl.constexpr(2)


@triton.jit
def fp8_act_quant_kernel(
    x_ptr, row_weight_ptr, q_ptr, scale_ptr, ids_ptr, map_ptr, routed_rows,
    K, rows_per_token, stride_xm, stride_xk, stride_qm, stride_sm,
    SCALE_ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr,
    ONLY_LOCAL_ROWS: tl.constexpr,
):
    row = tl.program_id(0)
    # Which rows are local comes from the routing, complete before GEMM1 started.
    groups, offs_k, mask, group_ok = row_groups(row, K, ids_ptr, map_ptr, routed_rows, GROUPS, GROUP, ONLY_LOCAL_ROWS)
    if PDL == PDL_READS_PREVIOUS:
        wait_then_release_dependents()
    x = tl.load(x_ptr + (row // rows_per_token) * stride_xm + offs_k * stride_xk, mask=mask, other=0.0)
    if SCALE_ROWS:
        x = (x.to(tl.float32) * tl.load(row_weight_ptr + row)).to(x_ptr.dtype.element_ty)
    store_quantized_groups(x.to(tl.float32), q_ptr + row * stride_qm + offs_k, scale_ptr + row * stride_sm + groups,
                           mask, group_ok)
    if PDL == PDL_BESIDE_PREVIOUS:
        tl.extra.cuda.gdc_wait()
