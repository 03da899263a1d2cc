"""The layer's output: the routed experts' fp32 sum [M, H], plus the output of a shared expert
computed apart from them (fp32 or the model dtype), rounded once to the model dtype.

torch.add(routed, shared, out=<model dtype>) computes the same bits (fp32 sum, one rounding). This
kernel exists so that the layer's last launch can be a programmatic dependent of GEMM2 (with
experts.EXPERT_PDL on): placed while GEMM2 streams its weights, it waits (griddepcontrol.wait) for
every kernel it depends on, the side stream's included, and its launch latency leaves the chain.
Reference: the final sum of reference.moe_layer.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .grid_sync import pdl_launch

BLOCK = 2048  # elements per program: few programs wait beside GEMM2 (4 at dsv3 M = 1, 224 at M = 64)


@triton.jit
def layer_output_kernel(routed_ptr, shared_ptr, out_ptr, numel, HAS_SHARED: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.load(routed_ptr + offs, mask=mask)
    if HAS_SHARED:
        total += tl.load(shared_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def layer_output(routed: torch.Tensor, shared: Optional[torch.Tensor], dtype: torch.dtype, pdl: bool) -> torch.Tensor:
    """(routed + shared) as ``dtype``; routed fp32 and shared contiguous [M, H]."""
    if routed.dtype != torch.float32 or not routed.is_contiguous():
        raise ValueError("routed must be a contiguous fp32 tensor")
    if shared is not None and (shared.shape != routed.shape or not shared.is_contiguous()):
        raise ValueError("shared must be contiguous and shaped like routed")
    out = torch.empty(routed.shape, dtype=dtype, device=routed.device)
    numel = routed.numel()
    if numel:
        layer_output_kernel[(triton.cdiv(numel, BLOCK),)](
            routed, shared if shared is not None else routed, out, numel, HAS_SHARED=shared is not None,
            BLOCK=BLOCK, PDL=pdl, num_warps=4, **pdl_launch(pdl))
    return out
