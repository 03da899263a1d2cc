"""The whole expert block in one launch: GEMM1, fp8 h quantisation and GEMM2 as work items of
one persistent grid, for small M, where the block is a chain of dependent launches whose gaps
and ramps cost more than the weights take to stream (dsv3-ep8 fp8 at M = 1: ~17 of 39 us).

Work items, handed out in this order from a counter (grid_sync.next_item):
  1. zeroing of GEMM2's fp32 accumulator (atomic mode), ZERO_BLOCK elements each;
  2. GEMM1 items (expert_gemm1_kernel.gemm1_item), each counted done per token tile;
  3. fp8 only: one item per (tile, 128-column group) of h, once the tile's GEMM1 items are all
     done: quantises it (expert_tiles.quantize_h_group, bitwise fp8_act_quant_kernel) and
     counts it done per tile;
  4. GEMM2 items (expert_gemm2_kernel.gemm2_item). A routed item first asks L2 for its Wd
     rows (prefetch), then waits for its tile's h (and, with a gated shared expert, for the
     gate partials of the first shared chunk's tile), then for the zeroing.
Items are taken in order, so a program only ever waits for items already taken by running
programs, whatever the grid size: GEMM2's weight stream starts while GEMM1's tail runs, and
no launch boundary separates the phases. The last program to finish re-arms the counters
(a zeroed buffer that persists between launches, experts._ticket_buffer).

Visibility: GEMM2 reads h (fp8: h_fp8 and h_scale) with the same pipelined loads as
expert_gemm2_kernel, and small ones may be served by the SM's L1, which is not coherent
within a launch. The buffers' rows are padded to whole 128-byte lines (experts._row_buffer),
so a line that a GEMM2 item reads holds rows of its own, ready tile only, never a row that
another tile has yet to write; L1 holds nothing from before the launch. Data read once per
item (h by the quantisation items, the gate partials) is read from L2 (.cg).

Counters: [next item, programs finished, zeroing items done, GEMM1 items done per tile
(max_tiles), h groups quantised per tile (max_tiles)].
"""
import os

import triton
import triton.language as tl

from .expert_gemm1_kernel import gemm1_item
from .expert_gemm2_kernel import gemm2_item, prefetch_item_weights
from .expert_tiles import A_FP8, FP8_GROUP, quantize_h_group, work_tile, zero_block
from .grid_sync import count_done, next_item, wait_until

NEXT_ITEM = tl.constexpr(0)
FINISHED = tl.constexpr(1)
ZEROED = tl.constexpr(2)
PER_TILE = tl.constexpr(3)  # first per-tile counter
FIXED_COUNTERS = 3
# L2 prefetch is inline PTX, which the interpreter cannot run.
CAN_PREFETCH = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _rearm_if_last(counters_ptr, num_counters, RESET_BLOCK: tl.constexpr):
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + FINISHED, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        for base in range(0, num_counters, RESET_BLOCK):
            offs = base + tl.arange(0, RESET_BLOCK)
            tl.store(counters_ptr + offs, tl.zeros((RESET_BLOCK,), tl.int32), mask=offs < num_counters)


@triton.jit
def expert_block_kernel(
    # GEMM1 (expert_gemm1_kernel's operands)
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
    # GEMM2 (expert_gemm2_kernel's operands; its A is h, or hq / hs for fp8)
    wd_ptr, wd_scale_ptr, swd_ptr, swd_scale_ptr, out_ptr,
    split_k, k_per_split, gate_parts,
    stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
    stride_swe, stride_swn, stride_swk, stride_sse, stride_ssn, stride_ssk,
    stride_out_split, stride_out_row,
    # both
    sorted_pair_ids_ptr, tile_expert_ptr, num_tiles_ptr, counters_ptr,
    num_pairs, top_k, M, H, I, zero_numel, max_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_K1: tl.constexpr, STAGES1: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_K2: tl.constexpr, STAGES2: tl.constexpr, SUB_K1: tl.constexpr, SUB_K2: tl.constexpr,
    A_MODE: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, APPLY_WEIGHT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    N_SHARED: tl.constexpr, SHARED_GATE: tl.constexpr, GATE_PARTS: tl.constexpr, MODEL_DTYPE: tl.constexpr,
    EVEN_N1: tl.constexpr, EVEN_K1: tl.constexpr, EVEN_N2: tl.constexpr, EVEN_K2: tl.constexpr,
    ZERO_BLOCK: tl.constexpr, PREFETCH_LINES: tl.constexpr,
):
    num_routed = tl.load(num_tiles_ptr)
    m_tiles = tl.cdiv(M, BLOCK_M)
    tiles = num_routed + N_SHARED * m_tiles
    n_blocks1 = tl.cdiv(I, BLOCK_N1)
    n_blocks2 = tl.cdiv(H, BLOCK_N2)
    items_per_tile2 = n_blocks2 * split_k
    groups = tl.cdiv(I, FP8_GROUP)
    gemm1_done = counters_ptr + PER_TILE
    h_ready = gemm1_done
    h_ready_target = n_blocks1
    quant_items = 0
    if A_MODE == A_FP8:
        h_ready = counters_ptr + PER_TILE + max_tiles
        h_ready_target = groups
        quant_items = tiles * groups
    zero_items = tl.cdiv(zero_numel, ZERO_BLOCK)
    gemm1_start = zero_items
    quant_start = gemm1_start + tiles * n_blocks1
    gemm2_start = quant_start + quant_items
    num_items = gemm2_start + tiles * items_per_tile2

    item = next_item(counters_ptr + NEXT_ITEM)
    while item < num_items:
        if item < gemm1_start:
            zero_block(out_ptr, item * ZERO_BLOCK, zero_numel, ZERO_BLOCK)
            count_done(counters_ptr + ZEROED)
        elif item < quant_start:
            tile = gemm1_item(
                item - gemm1_start, n_blocks1, num_routed, m_tiles,
                x_ptr, x_scale_ptr, pair_weight_ptr, wg_ptr, wu_ptr, wg_scale_ptr, wu_scale_ptr,
                swg_ptr, swu_ptr, swg_scale_ptr, swu_scale_ptr, gx_ptr, gw_ptr, gate_partial_ptr,
                h_ptr, hq_ptr, hs_ptr, counters_ptr, sorted_pair_ids_ptr, tile_expert_ptr,
                num_pairs, top_k, M, I, H,
                stride_xm, stride_xk, stride_xsm, stride_xsk,
                stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
                stride_sge, stride_sgn, stride_sgk, stride_sue, stride_sun, stride_suk,
                stride_swge, stride_swgn, stride_swgk, stride_swue, stride_swun, stride_swuk,
                stride_ssge, stride_ssgn, stride_ssgk, stride_ssue, stride_ssun, stride_ssuk,
                stride_gxm, stride_gxk, stride_hm, stride_hqm, stride_hsm,
                BLOCK_M, BLOCK_N1, BLOCK_K1, SUB_K1, STAGES1, A_MODE, WEIGHT_ON_INPUT, N_SHARED, SHARED_GATE, False,
                EVEN_N1, EVEN_K1,
            )
            count_done(gemm1_done + tile)
        elif item < gemm2_start:
            tile = (item - quant_start) // groups
            group = item - quant_start - tile * groups
            _, row, _, row_ok, _ = work_tile(tile, num_routed, m_tiles, tile_expert_ptr, sorted_pair_ids_ptr,
                                             num_pairs, top_k, M, BLOCK_M, N_SHARED)
            wait_until(gemm1_done + tile, n_blocks1)
            quantize_h_group(h_ptr, hq_ptr, hs_ptr, row, row_ok, group, I, stride_hm, stride_hqm, stride_hsm)
            count_done(h_ready + tile)
        else:
            item2 = item - gemm2_start
            tile = item2 // items_per_tile2
            if CAN_PREFETCH and PREFETCH_LINES > 0:
                if tile < num_routed:
                    prefetch_item_weights(item2, n_blocks2, items_per_tile2, tile_expert_ptr, wd_ptr, H, I,
                                          k_per_split, stride_we, stride_wn, stride_wk, BLOCK_N2, PREFETCH_LINES)
            wait_until(h_ready + tile, h_ready_target)
            if SHARED_GATE:
                if tile >= num_routed:  # the gate's partial dots come from shared chunk 0's tile
                    wait_until(h_ready + num_routed + (tile - num_routed) % m_tiles, h_ready_target)
            if not DETERMINISTIC:
                wait_until(counters_ptr + ZEROED, zero_items)
            if A_MODE == A_FP8:
                a_ptr, a_scale_ptr = hq_ptr, hs_ptr
                stride_am, stride_asm = stride_hqm, stride_hsm
            else:
                a_ptr, a_scale_ptr = h_ptr, hs_ptr
                stride_am, stride_asm = stride_hm, stride_hsm
            gemm2_item(
                item2, n_blocks2, items_per_tile2, num_routed, m_tiles,
                a_ptr, a_scale_ptr, pair_weight_ptr, wd_ptr, wd_scale_ptr, swd_ptr, swd_scale_ptr, gate_partial_ptr,
                out_ptr, sorted_pair_ids_ptr, tile_expert_ptr,
                num_pairs, top_k, M, H, I, k_per_split, gate_parts,
                stride_am, 1, stride_asm, 1,
                stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                stride_swe, stride_swn, stride_swk, stride_sse, stride_ssn, stride_ssk,
                stride_out_split, stride_out_row,
                BLOCK_M, BLOCK_N2, BLOCK_K2, SUB_K2, STAGES2, A_MODE, APPLY_WEIGHT, DETERMINISTIC,
                N_SHARED, SHARED_GATE, GATE_PARTS, MODEL_DTYPE, EVEN_N2, EVEN_K2,
            )
        item = next_item(counters_ptr + NEXT_ITEM)
    _rearm_if_last(counters_ptr, 2 * max_tiles + PER_TILE, 256)
