"""Ask L2 for the first bytes a split-K GEMM1 will stream from each K range of its weight rows.

Two weight matrices (gate and up) of ``rows`` rows each; a split-K GEMM1 (expert_gemm1_kernel) reads
each row in ``splits`` K ranges of ``k_per_split`` elements, each range from its start. This kernel
asks L2 for the first LINES 128-byte lines of every (row, range) of both, and returns: the requests
need nothing from any other launch, so they can run while the launch that makes GEMM1's input does.
With RECORD (the tests' mode; the interpreter has no PTX) it writes 1 into ``record_ptr``, a byte
map laid out as the weights, at each line it would have asked for.
"""
import triton
import triton.language as tl

LINE_BYTES = 128


@triton.jit
def _ask_l2(ptrs, mask):
    """One L2 prefetch per pointer (one per 128-byte line); nothing comes back to the program."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def l2_prefetch_kernel(
    gate_ptr, up_ptr, record_ptr, rows, K, stride_row, k_per_split, splits,
    LINES: tl.constexpr, LINE_ELEMENTS: tl.constexpr, BLOCK: tl.constexpr, RECORD: tl.constexpr,
):
    """Program (p, w): lines p * BLOCK.. of weight w (0: gate, 1: up), ordered by row, range, line."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    segment = idx // LINES
    split = segment % splits
    k = split * k_per_split + (idx % LINES) * LINE_ELEMENTS
    mask = (segment < rows * splits) & (k < tl.minimum(K, (split + 1) * k_per_split))
    offsets = (segment // splits).to(tl.int64) * stride_row + k
    if RECORD:
        record = record_ptr + tl.program_id(1).to(tl.int64) * rows * stride_row  # gate's rows, then up's
        tl.store(record + offsets, tl.full((BLOCK,), 1, tl.uint8), mask=mask)
    elif tl.program_id(1) == 0:
        _ask_l2(gate_ptr + offsets, mask)
    else:
        _ask_l2(up_ptr + offsets, mask)
