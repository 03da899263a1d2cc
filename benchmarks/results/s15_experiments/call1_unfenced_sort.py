"""pytest plugin (session 15 diagnostic): lifts topk_kernel.sort_fits' fence, so every routing tile
may pick by sort, to test whether the slot rule without the `last` reduction fixed the lost weights."""
from moe_fusion.lowering import topk_kernel

topk_kernel.sort_fits = lambda num_warps, meta: True
