"""The fused MoE preamble: x [M, H] -> everything the expert block needs.

Planned path (any M), launches chained by programmatic dependent launch (PDL) on CUDA, no host
synchronisation: norm_quant (RMSNorm, fp8 activation groups, zeroing of the router workspace),
split-K router GEMM, a row-parallel routing kernel, then the alignment kernel (align_kernel: one
program, or from 16 tokens one per two local experts) up to align_kernel.ALIGN_KERNEL_MAX_M tokens and
``reference.align_pairs`` (sync-free torch) above. For the fewest tokens (ROUTE_ALIGN_MAX_TILE) one
program routes and aligns (route_align_kernel), one launch instead of two. Where a kernel's
register tile cannot hold a spec's experts, that stage runs the reference instead;
``plan_preamble`` says which and why.

The one-launch alternative (``plan.fused``) runs router GEMM, routing and alignment in one grid
(router_kernel.py). It saves two launches but, with PDL hiding most launch latency, measured
slower than the general path at every shape and M on the H100 (v5, benchmarks/preamble_notes.md),
so the planner does not pick it (FUSED_MAX_M); the benchmark forces it to keep measuring it.

The norm is not folded into the router GEMM (r * ((x * w) @ W^T)): the reference rounds
x * r to the model dtype before the weight and the router see it, and the folded form moves
bf16 logits by ~1e-3 relative, enough to change top-k picks. Computing the norm first keeps
ids equal to the reference's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import triton

from ..spec import MoESpec, MoEWeights
from .unsupported import Unsupported
from . import align_kernel, reference, route_align_kernel, topk_kernel
from .grid_sync import pdl_launch
from .norm_quant_kernel import N_COUNTERS, norm_quant
from .route_align_kernel import route_and_align
from .router_kernel import _router_kernel, _router_route_align_kernel

# Largest M for the one-launch path: none (v5, H100: dsv3 M = 1 11.8 vs 10.0 us, mixtral 9.9 vs
# 5.4 us, and no better at any other M). Its router tile holds all rows, so at most 64 if re-enabled.
FUSED_MAX_M = 0
# Each kernel after the norm is a programmatic dependent launch (CUDA): it starts while the kernel
# before it runs and waits (griddepcontrol.wait) before reading that kernel's outputs.
USE_PDL = True
# Router programs per SM (through the split over K) for tiles of up to 16 rows, and for wider tiles.
# Each program adds its [rows, experts] tile of partial logits with fp32 atomics: a wider tile halves
# its split, trading weight streams in flight for fewer atomics per logit. H100, session 13, dsv3 bf16
# preamble with the alignment, 2 / 1 / 0.5 per SM: M = 16 (16-row tiles) 12.8 / 13.4 / 14.7 us,
# M = 64 (64 rows) 17.5 / 15.9 / 15.9 us.
ROUTER_PROGRAMS_PER_SM = 2
ROUTER_PROGRAMS_PER_SM_WIDE = 1
# Router tile (experts, K for half-precision operands; fp32 operands take half the K) for tiles of up
# to 16 rows, its K halved up to ROUTER_FEW_ROWS rows. Each program loads its first weight tile before
# it waits for the norm kernel (PDL); with one tile per program the norm hides the program's whole
# weight stream, and a longer K chunk means fewer split-K atomics per logit. H100, session 14, dsv3
# bf16 preamble (in-process A/B, benchmarks/results/s14_experiments/call3_router_tile_ab.txt), tiles
# (experts x K) 64x256 / 64x128 / 128x128 / 16x512 / 32x128: M = 1 7.4 / 7.5 / 7.5 / 8.0 / 7.6 us,
# M = 4 9.2 / 8.8 / 8.9 / 9.3 / 8.9, M = 8 10.3 / 10.9 / 10.9 / 10.3 / 12.6, M = 16 10.8 / 11.5 / 11.6 /
# 12.3 / 13.3; the earlier 128x64 (one K step of 64 per program, 112 splits; call 1) 7.9 / 9.9 / - / 12.7.
# That A/B keeps the router weight in L2; the bench, which reads it from HBM, agrees at M = 2 / 4 / 16:
# 128x64 10.1 / 10.9 / 13.7 us against these tiles' 9.8 / 10.5 / 13.3 and 12.7 (call6_bench_router_tiles.txt).
ROUTER_NARROW_BLOCK_E = 64
ROUTER_NARROW_BLOCK_K = 256
ROUTER_FEW_ROWS = 4
# The same for tiles of 64 rows (M > 16), and their warps. H100, session 14, dsv3 preamble at M = 32 / 64,
# in-process A/B with the router weight in L2 (call4_router_wide_tile_ab.txt): 128 x 64 12.3 / 14.8 us,
# 64 x 64 12.4 / 13.9, 64 x 128 on 8 warps 12.5 / 14.0, 128 x 128 on 8 14.0 / 15.5; but in the bench,
# whose router weights come from HBM (call6_bench_router_tiles.txt), 64 x 64 read 13.6 / 15.1 and 13.6 /
# 15.2 against 128 x 64's 13.2 / 15.2, so 128 x 64 stays.
ROUTER_WIDE_BLOCK_E = 128
ROUTER_WIDE_BLOCK_K = 64
ROUTER_WIDE_WARPS = 4
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PreambleOut(NamedTuple):
    normed: torch.Tensor  # [M, H], weight * rms_norm(x) (x itself, copied, without a norm)
    x_fp8: torch.Tensor  # [M, H] e4m3, or empty when the experts are not fp8
    x_scale: torch.Tensor  # [M, ceil(H/128)] fp32, or empty
    topk_ids: torch.Tensor  # [M, top_k] int32, global expert ids
    topk_weights: torch.Tensor  # [M, top_k] fp32
    sorted_pair_ids: torch.Tensor  # reference.align_pairs format
    tile_expert: torch.Tensor
    num_tiles: torch.Tensor


@dataclass
class RouterConfig:
    block_m: int  # rows per program
    block_e: int  # experts per program
    block_k: int  # hidden elements per loop step
    grid: tuple  # (k-chunks, expert blocks, row blocks)
    k_per_program: int
    num_warps: int = 4


@dataclass
class PreamblePlan:
    fused: bool  # one launch after the norm: router + routing + alignment
    route: str  # "kernel" | "reference"
    align: str  # "fused" | "with_routing" (route_align_kernel) | "kernel" | "reference"
    router: RouterConfig
    reasons: List[str] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: Optional[int]) -> int:
    if device_index is None:  # the interpreter on CPU: a few programs still exercise the split
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def router_config(M: int, E: int, H: int, dot_fp32: bool, sm_count: int, fused: bool,
                  block_e: Optional[int] = None, block_k: Optional[int] = None,
                  programs_per_sm: Optional[float] = None, num_warps: Optional[int] = None,
                  split_k: bool = True) -> RouterConfig:
    """Tiles and split so that about ``programs_per_sm`` programs per SM stream the router weight.

    split_k=False gives every logit to one program (one atomic add into zero, so the same bits on
    every run: the deterministic mode); narrow expert blocks then keep some parallelism."""
    bm = max(16, triton.next_power_of_2(M)) if fused else (16 if M <= 16 else 64)
    narrow = bm <= 16
    be = block_e or (min(max(16, triton.next_power_of_2(E)), ROUTER_NARROW_BLOCK_E if narrow else ROUTER_WIDE_BLOCK_E)
                     if split_k else 16)
    narrow_k = ROUTER_NARROW_BLOCK_K // (2 if M <= ROUTER_FEW_ROWS else 1)
    bk = block_k or (narrow_k if narrow else ROUTER_WIDE_BLOCK_K) // (2 if dot_fp32 else 1)
    e_blocks, m_blocks = triton.cdiv(E, be), triton.cdiv(max(M, 1), bm)
    k_blocks = triton.cdiv(H, bk)
    if programs_per_sm is None:
        programs_per_sm = ROUTER_PROGRAMS_PER_SM if narrow else ROUTER_PROGRAMS_PER_SM_WIDE
    wanted = max(1, int(programs_per_sm * sm_count) // (e_blocks * m_blocks)) if split_k else 1
    per_program = triton.cdiv(k_blocks, min(wanted, k_blocks))
    splits = triton.cdiv(k_blocks, per_program)  # no program without work
    warps = num_warps or (4 if narrow else ROUTER_WIDE_WARPS)
    return RouterConfig(bm, be, bk, (splits, e_blocks, m_blocks), per_program * bk, warps)


def _dot_fp32(spec: MoESpec, normed_dtype: torch.dtype, router_dtype: torch.dtype) -> bool:
    return normed_dtype == torch.float32 or (spec.router_fp32 and router_dtype != normed_dtype)


def plan_preamble(spec: MoESpec, M: int, normed_dtype: torch.dtype, router_dtype: torch.dtype,
                  device: torch.device, deterministic: bool = False, **router_overrides) -> PreamblePlan:
    reasons = []
    route = "kernel"
    if not topk_kernel.route_fits(spec):
        route = "reference"
        reasons.append(f"routing: {spec.num_experts} experts in {spec.n_group} groups exceed the routing tile "
                       f"({topk_kernel.MAX_ROUTE_TILE}); torch routing")
    align_ok = align_kernel.align_fits(spec.num_local_experts)
    if not align_ok:
        reasons.append(f"alignment: {spec.num_local_experts} local experts exceed the selection tile; torch alignment")
    fused = route == "kernel" and align_ok and 0 < M <= FUSED_MAX_M
    if fused:
        align = "fused"
    elif (route == "kernel" and align_ok
          and 0 < M * topk_kernel.padded_experts(spec) <= route_align_kernel.ROUTE_ALIGN_MAX_TILE):
        align = "with_routing"
    elif align_ok and M <= align_kernel.ALIGN_KERNEL_MAX_M:
        align = "kernel"
    else:
        align = "reference"
        if align_ok:
            reasons.append(f"alignment: M={M} > {align_kernel.ALIGN_KERNEL_MAX_M}, "
                           "the sort-based torch alignment is faster")
    sm = _sm_count(torch.device(device).index or 0) if torch.device(device).type == "cuda" else _sm_count(None)
    cfg = router_config(M, spec.num_experts, spec.hidden_size, _dot_fp32(spec, normed_dtype, router_dtype), sm,
                        fused, split_k=not deterministic, **router_overrides)
    return PreamblePlan(fused, route, align, cfg, reasons)


def _expert_map(spec: MoESpec, w: MoEWeights, expert_map: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    expert_map = expert_map if expert_map is not None else w.expert_map
    if expert_map is None:
        if spec.expert_parallel:
            raise Unsupported(f"spec has {spec.num_local_experts} of {spec.num_experts} experts local "
                              "but no expert_map was given")
        return None
    if tuple(expert_map.shape) != (spec.num_experts,):
        raise Unsupported(f"expert_map has shape {tuple(expert_map.shape)}, expected ({spec.num_experts},)")
    return expert_map.to(torch.int32).contiguous()


def _check(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> None:
    if x.dim() != 2 or x.shape[1] != spec.hidden_size:
        raise Unsupported(f"expected hidden states [M, {spec.hidden_size}], got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"hidden states of dtype {x.dtype}; the kernels take {SUPPORTED_DTYPES}")
    if tuple(w.router_weight.shape) != (spec.num_experts, spec.hidden_size):
        raise Unsupported(f"router_weight has shape {tuple(w.router_weight.shape)}")
    if w.router_weight.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"router_weight of dtype {w.router_weight.dtype}")
    if spec.rms_norm and (w.norm_weight is None or tuple(w.norm_weight.shape) != (spec.hidden_size,)):
        raise Unsupported("spec has an RMSNorm but norm_weight is missing or misshapen")
    if spec.correction_bias and (w.correction_bias is None or tuple(w.correction_bias.shape) != (spec.num_experts,)):
        raise Unsupported("spec has a correction bias but correction_bias is missing or misshapen")


def normed_dtype_of(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> torch.dtype:
    """The dtype of weight * rms_norm(x) (torch's promotion), or x's without a norm (or without
    its weight, which _check reports)."""
    has_norm = spec.rms_norm and w.norm_weight is not None
    return torch.promote_types(w.norm_weight.dtype, x.dtype) if has_norm else x.dtype


def fused_preamble(spec: MoESpec, x: torch.Tensor, w: MoEWeights, block_m: int,
                   expert_map: Optional[torch.Tensor] = None, plan: Optional[PreamblePlan] = None,
                   with_alignment: bool = True,
                   after_norm: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = None,
                   deterministic: bool = False) -> PreambleOut:
    """RMSNorm + router + routing + fp8 quantisation + alignment of x [M, H] (see the module doc).

    ``with_alignment=False`` skips the alignment (its three outputs are then empty), for callers
    such as the moe_preamble op that only want ids and weights. after_norm(normed, x_fp8, x_scale)
    is called once the norm is queued and before the router is: the point where work that needs
    only the normed states (the shared expert) can fork to another stream. ``deterministic``: the
    same bits on every run (the router's split-K sums with fp32 atomics otherwise)."""
    _check(spec, x, w)
    if block_m < 1:
        raise Unsupported(f"block_m must be >= 1, got {block_m}")
    expert_map = _expert_map(spec, w, expert_map) if with_alignment else None
    x = x if x.stride(1) == 1 else x.contiguous()
    M, device = x.shape[0], x.device
    norm_weight = w.norm_weight.contiguous() if spec.rms_norm else None
    normed_dtype = normed_dtype_of(spec, x, w)
    plan = plan or plan_preamble(spec, M, normed_dtype, w.router_weight.dtype, device, deterministic)
    logits, counters = router_workspace(spec, M, device)
    pdl = USE_PDL and x.is_cuda and M > 0
    norm_outputs = norm_quant(x, norm_weight, spec.rms_norm_eps, spec.fp8, logits, counters, normed_dtype, pdl=pdl)
    if after_norm is not None:
        after_norm(*norm_outputs)
    return route_normed(spec, w, norm_outputs, logits, counters, plan, block_m, expert_map, with_alignment, pdl)


def router_workspace(spec: MoESpec, M: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The router's split-K logits accumulator and its counters, both zeroed by the norm kernel."""
    return (torch.empty((max(M, 1), spec.num_experts), dtype=torch.float32, device=device),
            torch.empty((N_COUNTERS,), dtype=torch.int32, device=device))


def route_normed(spec: MoESpec, w: MoEWeights, norm_outputs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 logits: torch.Tensor, counters: torch.Tensor, plan: PreamblePlan, block_m: int,
                 expert_map: Optional[torch.Tensor], with_alignment: bool, pdl: bool) -> PreambleOut:
    """fused_preamble after the norm: router, routing and alignment of the norm's outputs, into the workspace
    the norm zeroed. ``pdl``: the router is a programmatic dependent of the kernel before it (the norm)."""
    normed, x_fp8, x_scale = norm_outputs
    M, normed_dtype, device = normed.shape[0], normed.dtype, normed.device
    L = spec.num_local_experts
    ids = torch.empty((M, spec.top_k), dtype=torch.int32, device=device)
    weights = torch.empty((M, spec.top_k), dtype=torch.float32, device=device)
    if M == 0 or not with_alignment:
        no_alignment = tuple(torch.empty((0,), dtype=torch.int32, device=device) for _ in range(3))
        aligned = reference.align_pairs(ids, expert_map, L, block_m) if with_alignment else no_alignment
    if M == 0:
        return PreambleOut(normed, x_fp8, x_scale, ids, weights, *aligned)

    bias = w.correction_bias.contiguous() if spec.correction_bias else logits
    rw, cfg = w.router_weight, plan.router
    dot_fp32 = _dot_fp32(spec, normed_dtype, rw.dtype)
    gemm_args = (normed, normed.stride(0), rw, rw.stride(0), rw.stride(1), logits, logits.stride(0))
    if plan.fused:
        if with_alignment:
            sorted_ids, tile_expert, num_tiles = align_kernel.alloc_align_outputs(M, spec.top_k, L, block_m, device)
        else:
            sorted_ids, tile_expert, num_tiles = aligned
        route_meta = topk_kernel.route_meta(spec, normed_dtype, M, topk_kernel.ROWS_TILE)
        k_splits, gemm_programs = cfg.grid[0], cfg.grid[0] * cfg.grid[1]
        route_programs = triton.cdiv(M, route_meta["ROWS"])
        _router_route_align_kernel[(gemm_programs + route_programs + int(with_alignment),)](
            *gemm_args, counters, M, spec.num_experts, spec.hidden_size, cfg.k_per_program,
            k_splits, gemm_programs, route_programs,
            bias, ids, weights, ids.stride(0), spec.renormalize_eps, spec.routed_scaling_factor,
            expert_map if expert_map is not None else ids, sorted_ids, tile_expert, num_tiles, L, block_m,
            tile_expert.numel(), BM=cfg.block_m, BE=cfg.block_e, BK=cfg.block_k, DOT_FP32=dot_fp32,
            **route_meta, **align_kernel.align_meta_after_routing(L, spec.top_k, expert_map, M),
            SORT_PICKS=topk_kernel.picks_by_sort(cfg.num_warps),
            ALIGN=with_alignment, PDL=pdl, num_warps=cfg.num_warps, **pdl_launch(pdl),
        )
        return PreambleOut(normed, x_fp8, x_scale, ids, weights, sorted_ids, tile_expert, num_tiles)

    _router_kernel[cfg.grid](*gemm_args, M, spec.num_experts, spec.hidden_size, cfg.k_per_program,
                             BM=cfg.block_m, BE=cfg.block_e, BK=cfg.block_k, DOT_FP32=dot_fp32, PDL=pdl,
                             num_warps=cfg.num_warps, **pdl_launch(pdl))
    if plan.align == "with_routing" and with_alignment:
        sorted_ids, tile_expert, num_tiles = route_and_align(spec, logits, bias, normed_dtype, ids, weights,
                                                             expert_map, block_m, pdl=pdl)
        return PreambleOut(normed, x_fp8, x_scale, ids, weights, sorted_ids, tile_expert, num_tiles)
    if plan.route == "kernel":
        topk_kernel.select_experts(spec, logits, bias, normed_dtype, ids, weights, pdl=pdl)
    else:
        rounded = logits if spec.router_fp32 or normed_dtype == torch.float32 else logits.to(normed_dtype).float()
        ref_ids, ref_weights = reference.select_experts(spec, rounded, w.correction_bias if spec.correction_bias else None)
        ids.copy_(ref_ids)
        weights.copy_(ref_weights)
    if not with_alignment:
        sorted_ids, tile_expert, num_tiles = aligned
    elif plan.align == "kernel":
        sorted_ids, tile_expert, num_tiles = align_kernel.align_pairs(ids, expert_map, L, block_m, pdl=pdl)
    else:
        sorted_ids, tile_expert, num_tiles = reference.align_pairs(ids, expert_map, L, block_m)
    return PreambleOut(normed, x_fp8, x_scale, ids, weights, sorted_ids, tile_expert, num_tiles)


def reference_preamble(spec: MoESpec, x: torch.Tensor, w: MoEWeights, block_m: int,
                       expert_map: Optional[torch.Tensor] = None) -> PreambleOut:
    """The same outputs from plain PyTorch (reference.py): the baseline and the test oracle."""
    expert_map = expert_map if expert_map is not None else w.expert_map
    outputs = reference.preamble_outputs(spec, x, w)
    aligned = reference.align_pairs(outputs[3], expert_map, spec.num_local_experts, block_m)
    return PreambleOut(*outputs, *aligned)
