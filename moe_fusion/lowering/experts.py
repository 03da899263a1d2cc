"""The routed-expert block on the GPU: two grouped-GEMM launches (plus one finalize launch in
deterministic mode) over the aligned token list of reference.align_pairs.

    GEMM1  h[pair] = SiLU(x Wg^T) * (x Wu^T)              expert_gemm1_kernel (also zeroes out)
           or, split over K, fp32 sums per split        + gemm1_combine_kernel (SiLU*up, fp8 quant)
    GEMM2  out[token] += weight[pair] * h[pair] Wd^T       expert_gemm2_kernel (atomics, split-K)
    or     y[split, pair] = weight * h Wd^T; out = sum y   + moe_finalize_kernel (deterministic)

bf16/fp16 weights, or fp8 e4m3 weights in 128x128 blocks with 1x128 activation groups: x comes
quantised from the preamble (or fp8_act_quant_kernel quantises it first), and an fp8_act_quant_kernel
launch between the GEMMs quantises h (or gemm1_combine_kernel after a split GEMM1, or GEMM1's
epilogue, FUSED_H_QUANT), so neither GEMM quantises inside its K loop. Tiles may swap operands
(weights . tokens^T, expert_tiles.tile_dot) so that 16-token tiles use Hopper's wide MMA. Grids are
persistent (at most programs_per_sm x SMs programs looping up to the real tile count). Semantics:
reference.routed_experts (fp8: bitwise the reference's quantisation on the same device).
Shared experts can ride along as a dense tail of both GEMMs (SharedTail, the layer's "fused"
strategy): every token selects them, so they need no alignment. Tile
shapes: expert_configs (a tuned table per device, a heuristic elsewhere). Measured results and
their story: benchmarks/experts_notes.md.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.multiprocessing.reductions import StorageWeakRef

from ..spec import FP8_BLOCK, FP8_DTYPE, MoESpec, MoEWeights
from .unsupported import Unsupported
from . import align_kernel, expert_configs, reference
from .expert_configs import ExpertConfig, ProblemKey
from .expert_gemm1_kernel import expert_gemm1_kernel
from .expert_gemm2_kernel import expert_gemm2_kernel
from . import expert_tiles
from . import fp8_act_quant_kernel as fp8_act_quant
from .fp8_weight_quant_kernel import fp8_weight_quant_kernel
from .gemm1_combine_kernel import gemm1_combine_kernel
from .graph_pools import made_outside_graph_pools
from .grid_sync import pdl_launch
from .moe_finalize_kernel import moe_finalize_kernel

INT32_MAX = 2**31 - 1
A_MODEL_DTYPE = expert_tiles.A_MODEL_DTYPE.value
A_FP8 = expert_tiles.A_FP8.value
MODEL_DTYPES = (torch.bfloat16, torch.float16)
ZERO_BLOCK = 1024
FINALIZE_BLOCK_N = 1024
INTERPRETER_SMS = 4  # "SM count" under TRITON_INTERPRET=1: a few programs, so the loops loop
# Programmatic dependent launches inside the expert block (CUDA only), MOE_FUSION_EXPERT_PDL:
#   "off": plain launches;
#   "h": the small launches after a GEMM are placed while it runs and wait for it
#        (griddepcontrol.wait), so their launch latency leaves the chain: the one that prepares
#        GEMM2's A (gemm1_combine_kernel, or fp8_act_quant_kernel for h) after GEMM1, and the
#        layer's output (layer_output_kernel) after GEMM2;
#   "h+gemm2": GEMM2 is also placed early, as the h launch's dependent once GEMM1 has finished, and
#        waits for h.
#   "auto" (the default): "h+gemm2" from GEMM2_EARLY_FROM_M tokens to below the launch's own bound
#        (ROUTED_ / SHARED_GEMM2_EARLY_BELOW_M), "h" elsewhere.
# Session 9, dsv3-ep8 fp8 layer, in-process A/B (benchmarks/gpu_layer_ab.py): on the H100 "h" was
# 2.1 / 1.9 / 1.3 us faster than "off" at M = 1 / 2 / 4. "h+gemm2" was first measured with GEMM2's first
# weights pulled into L2 before the wait, and lost (sessions 9, 10, 20). Without that prefetch, by hit
# count at the bench's routing (sessions 21-22, benchmarks/results/session22.md), three H100s: dsv3-ep8
# fp8 at M = 4 0.8 / 0.8 / 1.1 us faster than "h"; at M = 1 slower at 1-3 local experts hit in all three
# (0.3-1.1 us), -0.2 / -0.1 / +0.8 us in all; dsv3 fp8 0.4 / 0.9 us faster at M = 1 / 4 on one.
# Session 23 (session23.md): ~1 us faster at dsv3-ep8 M = 2-24 and dsv3 fp8 M = 2-16, equal on dsv3 from
# M = 32 and on bf16, but at dsv3-ep8 M = 64 10 us slower, most of it the shared expert's launch: placed
# early in it alone, +1.5 / +6.3 / +7.2 us at M = 32 / 48 / 64; in the routed launch alone -1.4 at M = 32,
# +1.1 / +2.3 at M = 48 / 64, and +2.7 at M = 40 in a third call (-0.7 at M = 32 there). Early only where
# measured faster. The shared expert placing GEMM2 early only at M = 1 was -0.4 and +0.3 us in two calls:
# not taken.
# A GEMM2 placed while GEMM1 itself still ran (run 3 of experts_notes.md) gained nothing and cost 4%
# at dsv3 M = 1: its programs held the SM slots GEMM1's last wave needed.
PDL_MODES = ("off", "h", "h+gemm2")
GEMM2_EARLY_FROM_M = 2
ROUTED_GEMM2_EARLY_BELOW_M = 33
SHARED_GEMM2_EARLY_BELOW_M = 25
EXPERT_PDL = os.environ.get("MOE_FUSION_EXPERT_PDL", "auto")
# fp8: h quantised in GEMM1's epilogue (one launch fewer) with MOE_FUSION_FP8_H_QUANT=gemm1. Off by
# default: on the H100 (run 5) it was 6-7 us slower at dsv3-ep8 M = 1-2 and 1 us faster at M = 4
# (the ticket's barrier and acq_rel atomic after every GEMM1 item cost more than the launch saved).
FUSED_H_QUANT = os.environ.get("MOE_FUSION_FP8_H_QUANT", "kernel") == "gemm1"

log = logging.getLogger("moe_fusion.lowering")


Alignment = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sorted_pair_ids, tile_expert, num_tiles


@dataclass
class ExpertTensors:
    """One set of gated-MLP experts in canonical layout: w_gate/w_up [E, I, H], w_down [E, H, I]."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    w_gate_scale: Optional[torch.Tensor] = None
    w_up_scale: Optional[torch.Tensor] = None
    w_down_scale: Optional[torch.Tensor] = None
    expert_map: Optional[torch.Tensor] = None  # global id -> local id or -1
    num_global_experts: int = 0  # 0: as many as local ones

    @property
    def fp8(self) -> bool:
        return self.w_gate.dtype == FP8_DTYPE

    @property
    def num_local(self) -> int:
        return self.w_gate.shape[0]

    @property
    def num_global(self) -> int:
        return self.num_global_experts or self.num_local

    @staticmethod
    def of(spec: MoESpec, w: MoEWeights) -> "ExpertTensors":
        return ExpertTensors(w.w_gate, w.w_up, w.w_down, w.w_gate_scale, w.w_up_scale, w.w_down_scale,
                             w.expert_map if spec.expert_parallel else None, spec.num_experts)


# --------------------------------------------------------------------------- entry points
def fused_experts(
    spec: MoESpec,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w: MoEWeights,
    *,
    x_fp8: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None,
    alignment: Optional[Alignment] = None,
    deterministic: bool = False,
    config: Optional[ExpertConfig] = None,
    out_dtype: torch.dtype = torch.float32,
    shared: Optional["SharedTail"] = None,
    after_gemm1: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """reference.routed_experts on the expert kernels: sum over the top-k of weight * expert(x),
    local experts only, as ``out_dtype`` [M, H] (fp32 by default, like the reference).

    x [M, H] is the (normed) model-dtype input; for fp8 specs x_fp8/x_scale are its 1x128-group
    quantisation from the preamble (fp8_act_quant_kernel quantises x when they are not given). alignment
    is reference.align_pairs' output for ``config.block_m``; computed here when not given.
    deterministic: per-pair partial rows + a fixed-order finalize instead of fp32 atomics.
    shared (shared_tail(spec, w)): the shared experts are added by the same launches.
    after_gemm1: called once GEMM1 is queued (the layer forks work that should wait for it).
    Raises Unsupported when the spec or tensors are outside what the kernels take.
    """
    spec, w = with_fp8_experts(spec, w)
    if spec.quant not in ("none", "fp8_block"):
        raise Unsupported(f"quantization {spec.quant!r}")
    if x.dtype != spec.torch_dtype:
        raise Unsupported(f"x is {x.dtype}, the spec says {spec.dtype}")
    return run_experts(
        x, topk_ids, topk_weights, ExpertTensors.of(spec, w), x_fp8=x_fp8, x_scale=x_scale,
        weight_on_input=spec.weight_on == "input", alignment=alignment, deterministic=deterministic,
        config=config, out_dtype=out_dtype, shared=shared, after_gemm1=after_gemm1,
    )


def shared_experts(
    spec: MoESpec, x: torch.Tensor, w: MoEWeights, *, deterministic: bool = False,
    out_dtype: torch.float32 = torch.float32,
) -> torch.Tensor:
    """reference.shared_experts computed separately on the expert kernels: the shared MLP
    (width shared_intermediate_size) as one expert that every token selects with weight 1, or
    with its sigmoid gate."""
    if not spec.has_shared_experts:
        raise Unsupported("the spec has no shared experts")
    M = x.shape[0]
    ids = torch.zeros((M, 1), dtype=torch.int32, device=x.device)
    experts = ExpertTensors(w.shared_gate.unsqueeze(0), w.shared_up.unsqueeze(0), w.shared_down.unsqueeze(0))
    return run_experts(x, ids, shared_gate_weights(spec, x, w).unsqueeze(1), experts,
                       deterministic=deterministic, out_dtype=out_dtype)


def shared_gate_weights(spec: MoESpec, x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    """Per-token weight of the shared expert(s): 1, or sigmoid(x @ shared_expert_gate^T) (fp32 [M])."""
    if not spec.shared_gate:
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    gate = torch.nn.functional.linear(x, w.shared_expert_gate.to(x.dtype))
    return torch.sigmoid(gate).float().squeeze(1)


@dataclass
class SharedTail:
    """Shared experts computed by the routed-expert kernels, as a dense tail of both GEMMs.

    A shared MLP of width Is = n*I is the sum of n experts of width I (SiLU*up is elementwise in
    I), so it runs as n extra experts that every token selects, with weight 1 or the sigmoid of
    its shared-expert gate. ``experts`` holds those n chunks ([n, I, H] / [n, H, I], views of
    the shared weights; block-quantised fp8 copies when the routed experts are fp8).
    """

    experts: ExpertTensors
    gate: Optional[torch.Tensor] = None  # shared_expert_gate as [H], or None for weight 1

    @property
    def count(self) -> int:
        return self.experts.num_local


def shared_tail(spec: MoESpec, w: MoEWeights) -> SharedTail:
    """The shared experts of ``spec`` as a SharedTail (fp8 copies made once and cached, see
    _fp8_copies). Raises Unsupported for shared experts the tail cannot express."""
    problem = shared_tail_problem(spec)
    if problem:
        raise Unsupported(problem)
    I = spec.intermediate_size
    n = spec.shared_intermediate_size // I
    chunks = ExpertTensors(w.shared_gate.unflatten(0, (n, I)), w.shared_up.unflatten(0, (n, I)),
                           w.shared_down.unflatten(1, (n, I)).permute(1, 0, 2))
    if spec.fp8:
        chunks = _fp8_copies("shared expert", chunks, (w.shared_gate, w.shared_up, w.shared_down))
    gate = w.shared_expert_gate.reshape(-1).contiguous() if spec.shared_gate else None
    return SharedTail(chunks, gate)


def shared_tail_problem(spec: MoESpec) -> Optional[str]:
    """Why the shared experts of ``spec`` cannot be a SharedTail, or None."""
    if not spec.has_shared_experts:
        return "the spec has no shared experts"
    if spec.weight_on != "output":
        return "routing weight on the expert input: the shared experts' unscaled input is not the routed A operand"
    if spec.shared_intermediate_size % spec.intermediate_size:
        return (f"shared width {spec.shared_intermediate_size} is not a multiple of the expert width "
                f"{spec.intermediate_size}")
    return None


# (device, M, n, block_m) -> dense_routing's constant tensors, up to DENSE_ROUTING_CACHE_MAX_M tokens
# (decode sizes: at most that many entries of a few KB). Entries are never dropped: a captured
# CUDA graph may read them.
_dense_routing_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, Alignment]] = {}
DENSE_ROUTING_CACHE_MAX_M = 1024


def dense_routing(M: int, n: int, block_m: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, Alignment]:
    """Every token selecting local experts 0..n-1 with weight 1 (the shared experts run as a
    routed block of their own): topk_ids [M, n] int32, weights [M, n] fp32 and their alignment
    (reference.align_pairs' format: expert e's M tokens in cdiv(M, block_m) tiles, in order).
    Constants, made once per (device, M, n, block_m) up to DENSE_ROUTING_CACHE_MAX_M tokens, and
    per call above (a few small launches, next to a prefill-sized layer) or under CUDA-graph
    capture (inside the graph)."""
    key = (str(device), M, n, block_m)
    hit = _dense_routing_cache.get(key)
    if hit is not None:
        return hit
    if M > DENSE_ROUTING_CACHE_MAX_M or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return _dense_routing_tensors(M, n, block_m, device)
    made = made_outside_graph_pools(lambda: _dense_routing_tensors(M, n, block_m, device), device)
    _dense_routing_cache[key] = made
    return made


def _dense_routing_tensors(M: int, n: int, block_m: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                         Alignment]:
    tiles_per_expert = triton.cdiv(M, block_m)
    ids = torch.arange(n, dtype=torch.int32, device=device).repeat(M, 1)
    weights = torch.ones((M, n), dtype=torch.float32, device=device)
    slot = torch.arange(tiles_per_expert * block_m, dtype=torch.int32, device=device)
    expert = torch.arange(n, dtype=torch.int32, device=device).unsqueeze(1)
    sorted_pair_ids = torch.where(slot < M, slot * n + expert, M * n).reshape(-1)
    tile_expert = expert.expand(n, tiles_per_expert).reshape(-1).contiguous()
    num_tiles = torch.full((1,), n * tiles_per_expert, dtype=torch.int32, device=device)
    return ids, weights, (sorted_pair_ids.to(torch.int32), tile_expert, num_tiles)


# (storage, offset, shape, stride, dtype, version) of three weights -> their fp8 copies
_fp8_cache: Dict[tuple, Tuple[list, ExpertTensors]] = {}


def _fp8_copies(what: str, tensors: ExpertTensors, sources: Tuple[torch.Tensor, ...]) -> ExpertTensors:
    """``tensors`` block-quantised (quantize_expert_tensors_fp8), made once per set of ``sources``
    (the model's weights they are views of).

    The key is each weight's storage, view and version counter, so an in-place update of the
    weights (load_state_dict) makes new copies; the storages are held weakly (an entry whose
    storage was freed is dropped, and a live weak reference keeps a freed storage's address from
    being reused). Costs 3*I*H bytes + scales per expert (DeepSeek-V3: 44 MB), logged.
    Under CUDA-graph capture a miss quantises inside the graph without caching (correct, slower).
    """
    key = tuple((StorageWeakRef(t.untyped_storage()).cdata, t.storage_offset(), tuple(t.shape), t.stride(),
                 t.dtype, str(t.device), t._version) for t in sources)
    hit = _fp8_cache.get(key)
    if hit is not None and not any(ref.expired() for ref in hit[0]):
        return hit[1]
    if sources[0].is_cuda and torch.cuda.is_current_stream_capturing():
        log.warning("moe_fusion: fp8 copies of the %s weights made inside CUDA-graph capture are not cached; "
                    "run the layer once before capturing", what)
        return quantize_expert_tensors_fp8(tensors)
    quantized = made_outside_graph_pools(lambda: quantize_expert_tensors_fp8(tensors), sources[0].device)
    for stale in [k for k, (refs, _) in _fp8_cache.items() if any(r.expired() for r in refs)]:
        del _fp8_cache[stale]
    _fp8_cache[key] = ([StorageWeakRef(t.untyped_storage()) for t in sources], quantized)
    size = sum(t.numel() * t.element_size() for t in (quantized.w_gate, quantized.w_up, quantized.w_down,
                                                      quantized.w_gate_scale, quantized.w_up_scale,
                                                      quantized.w_down_scale))
    log.info("moe_fusion: fp8 copy of the %s weights, %.1f MB (%d cached sets)", what, size / 2**20, len(_fp8_cache))
    return quantized


def with_fp8_experts(spec: MoESpec, w: MoEWeights) -> Tuple[MoESpec, MoEWeights]:
    """reference.with_fp8_experts with the copies made once per set of weights (_fp8_copies) by
    the quantisation kernel (bitwise reference.quantize_fp8_blocks)."""
    def cached(gate, up, down):
        return _fp8_fields(_fp8_copies("routed expert", ExpertTensors(gate, up, down), (gate, up, down)))

    return reference.with_fp8_experts(spec, w, cached)


def _quantized_fields(gate, up, down) -> tuple:
    """reference.with_fp8_experts' quantize on the kernel, without caching."""
    return _fp8_fields(quantize_expert_tensors_fp8(ExpertTensors(gate, up, down)))


def _fp8_fields(q: ExpertTensors) -> tuple:
    return q.w_gate, q.w_up, q.w_down, q.w_gate_scale, q.w_up_scale, q.w_down_scale


def quantize_expert_weights_fp8(spec: MoESpec, w: MoEWeights) -> Tuple[MoESpec, MoEWeights]:
    """The one-time weight quantisation for fp8 experts on a bf16/fp16 model: the same layer with
    e4m3 w_gate/w_up/w_down in 128x128 blocks and fp32 scales (bitwise reference.quantize_fp8_blocks)."""
    if spec.fp8:
        return spec, w
    return reference.with_fp8_experts(spec.replace(quant="fp8_block_quantize"), w, _quantized_fields)


def quantize_expert_tensors_fp8(e: ExpertTensors) -> ExpertTensors:
    qg, sg = quantize_fp8_blocks(e.w_gate)
    qu, su = quantize_fp8_blocks(e.w_up)
    qd, sd = quantize_fp8_blocks(e.w_down)
    return ExpertTensors(qg, qu, qd, sg, su, sd, e.expert_map, e.num_global_experts)


def quantize_fp8_blocks(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> (e4m3 [E, N, K], fp32 scale [E, ceil(N/128), ceil(K/128)]) on the GPU kernel."""
    if not _kernels_can_run(w):
        return reference.quantize_fp8_blocks(w)
    E, N, K = w.shape
    nb, kb = triton.cdiv(N, FP8_BLOCK), triton.cdiv(K, FP8_BLOCK)
    q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((E, nb, kb), dtype=torch.float32, device=w.device)
    if E * nb * kb:
        fp8_weight_quant_kernel[(E * nb * kb,)](w, q, scale, N, K, nb, kb, *w.stride(), BLOCK=FP8_BLOCK,
                                                 num_warps=8)
    return q, scale


# --------------------------------------------------------------------------- configs
def pdl_mode(device: torch.device, m: int, launch: str = "routed") -> str:
    """The PDL mode (one of PDL_MODES) of an expert launch of m tokens, the routed experts' or the
    shared expert's: EXPERT_PDL, resolved by m and launch where it is "auto", where launches can be
    programmatic dependents (CUDA); "off" elsewhere."""
    if EXPERT_PDL not in PDL_MODES + ("auto",):
        raise ValueError(f"MOE_FUSION_EXPERT_PDL={EXPERT_PDL!r}; expected auto or one of {PDL_MODES}")
    if device.type != "cuda":
        return "off"
    if EXPERT_PDL == "auto":
        below = {"routed": ROUTED_GEMM2_EARLY_BELOW_M, "shared": SHARED_GEMM2_EARLY_BELOW_M}[launch]
        return "h+gemm2" if GEMM2_EARLY_FROM_M <= m < below else "h"
    return EXPERT_PDL


def device_facts(device: torch.device) -> Tuple[str, int]:
    """(name used by the config table, SM count)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.multi_processor_count
    return "interpreter", INTERPRETER_SMS


def problem_key(experts: ExpertTensors, hidden: int, top_k: int) -> ProblemKey:
    dtype = "fp8" if experts.fp8 else str(experts.w_gate.dtype).replace("torch.", "")
    return ProblemKey(dtype, hidden, experts.w_gate.shape[1], experts.num_local, experts.num_global, top_k)


def expert_config(spec: MoESpec, m: int, device: torch.device) -> ExpertConfig:
    """The tile configuration fused_experts uses for m tokens (its block_m is the alignment's)."""
    return _tiles(spec, spec.num_local_experts, spec.num_experts, spec.top_k, m, device)


def shared_expert_config(spec: MoESpec, m: int, device: torch.device) -> ExpertConfig:
    """The tiles of the shared experts run as a launch of their own: every one of m tokens selects
    all n chunks of width I (a dense problem, tuned apart: "dsv3-shared" in tune_experts)."""
    n = spec.shared_intermediate_size // spec.intermediate_size
    return _tiles(spec, n, n, n, m, device)


def _tiles(spec: MoESpec, local: int, routed: int, top_k: int, m: int, device: torch.device) -> ExpertConfig:
    key = ProblemKey("fp8" if spec.fp8 else spec.dtype, spec.hidden_size, spec.intermediate_size, local, routed, top_k)
    name, sms = device_facts(device)
    return expert_configs.lookup(key, m, name, sms)[0]


# --------------------------------------------------------------------------- launches
def run_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: ExpertTensors,
    *,
    x_fp8: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None,
    weight_on_input: bool = False,
    alignment: Optional[Alignment] = None,
    deterministic: bool = False,
    config: Optional[ExpertConfig] = None,
    out_dtype: torch.dtype = torch.float32,
    shared: Optional[SharedTail] = None,
    after_gemm1: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x) over local experts, on the kernels,
    plus the shared experts of ``shared`` (weight 1 or their gate) when given; after_gemm1() is
    called once GEMM1 is queued."""
    M, H = x.shape
    top_k = topk_ids.shape[1]
    I = experts.w_gate.shape[1]
    _check(x, topk_ids, topk_weights, experts, H, I)
    if shared is not None:
        _check_shared(x, experts, shared, weight_on_input, H, I)
    name, num_sms = device_facts(x.device)
    if config is None:
        config = expert_configs.lookup(problem_key(experts, H, top_k), M, name, num_sms)[0]
    problem = expert_configs.validate(config, experts.fp8)
    if problem:
        raise Unsupported(f"config {config}: {problem}")
    block_m = config.block_m
    pdl = pdl_mode(x.device, M)
    aligned_here = alignment is None
    if aligned_here:  # the x quantisation below may run beside it (it releases its dependents at once)
        alignment = align_kernel.align_pairs_fastest(topk_ids, experts.expert_map, experts.num_local, block_m,
                                                     launch_dependents=pdl != "off")
    sorted_pair_ids, tile_expert, num_tiles = alignment
    max_tiles = tile_expert.numel()
    if sorted_pair_ids.numel() != max_tiles * block_m:
        raise Unsupported(f"alignment is for block_m {sorted_pair_ids.numel() // max(max_tiles, 1)}, "
                          f"the config uses {block_m}")
    num_pairs = topk_ids.numel()
    split_k = config.gemm2.split_k
    _check_int32(num_pairs + (shared.count * M if shared is not None else 0), H, I, split_k, config.gemm1.split_k)
    pair_weights = topk_weights.reshape(-1).float()

    if x_fp8 is not None and (x_fp8.shape != x.shape or x_scale is None
                              or tuple(x_scale.shape) != (M, triton.cdiv(H, FP8_BLOCK))):
        raise Unsupported("x_fp8 / x_scale do not match x [M, H] in 1x128 groups")
    launch = ExpertLaunch(
        x=x, pair_weights=pair_weights, topk_ids=topk_ids, experts=experts, alignment=alignment,
        weight_on_input=weight_on_input, num_sms=num_sms, pdl=pdl, shared=shared,
    )
    launch.allocate(config, deterministic, out_dtype)
    launch.quantize_input(x_fp8, x_scale, beside_alignment=aligned_here)
    launch.gemm1(config)
    if after_gemm1 is not None:
        after_gemm1()
    launch.prepare_h()
    launch.gemm2(config)
    return launch.finalize()


@dataclass
class ExpertLaunch:
    """The operands and buffers of one expert-block call, and its launches one by one (the tuner
    times GEMM1 and GEMM2 separately through this)."""

    x: torch.Tensor
    pair_weights: torch.Tensor  # [num_pairs] fp32
    topk_ids: torch.Tensor
    experts: ExpertTensors
    alignment: Alignment
    weight_on_input: bool
    num_sms: int
    pdl: str = "off"  # one of PDL_MODES
    shared: Optional[SharedTail] = None  # shared experts as a dense tail after the routed tiles
    # May run beside another launch (on the side stream): then GEMM1 does not quantise h in its
    # epilogue, whose tickets are one set per device under CUDA graphs.
    on_side_stream: bool = False
    # The alignment is dense_routing's: the kernels compute it instead of reading it (expert_tiles.work_tile).
    dense_alignment: bool = False

    def __post_init__(self):
        if self.dense_alignment and self.shared is not None:
            raise ValueError("a dense alignment has no room for a shared-expert tail")

    @property
    def small_launches_dependent(self) -> bool:
        """The h launch and what follows GEMM2 are programmatic dependents (EXPERT_PDL "h" and up)."""
        return self.pdl != "off"

    @property
    def n_shared(self) -> int:
        return self.shared.count if self.shared is not None else 0

    def allocate(self, config: ExpertConfig, deterministic: bool, out_dtype: torch.dtype) -> None:
        M, H = self.x.shape
        I = self.experts.w_gate.shape[1]
        rows = self.topk_ids.numel() + self.n_shared * M  # routed pairs, then each shared expert's tokens
        dev = self.x.device
        self.split_k, self.deterministic, self.out_dtype = config.gemm2.split_k, deterministic, out_dtype
        self.h = _buffer((rows, I), self.x.dtype, dev)
        self.use_gemm1_splits(config.gemm1.split_k)
        if self.experts.fp8:  # GEMM2's A: h quantised per 1x128 group
            self.h_fp8 = _buffer((rows, I), FP8_DTYPE, dev)
            self.h_scale = _buffer((rows, triton.cdiv(I, FP8_BLOCK)), torch.float32, dev)
        if deterministic:
            self.partial = _buffer((self.split_k, rows, H), torch.float32, dev)
            self.out = _buffer((M, H), out_dtype, dev)
        else:
            self.partial = _buffer((M, H), torch.float32, dev)  # fp32 atomic accumulator
        self.scales = _scales(self.experts)
        self.shared_scales = _scales(self.shared.experts) if self.shared is not None else self.scales
        self.gate_partial = self.pair_weights  # unused unless the shared experts are gated (gemm1)
        self.h_quantized = False
        self.h_prepared_by_launch = False  # GEMM2 follows a launch of its own that made its A
        self.a, self.a_scale, self.a_row_divisor = self.x, self.pair_weights, self.topk_ids.shape[1]

    def use_gemm1_splits(self, splits: int) -> None:
        """A split GEMM1 leaves fp32 gate and up sums per split for gemm1_combine_kernel."""
        rows, I = self.h.shape
        self.gemm1_splits = splits
        self.gemm1_sums = _buffer((splits, rows, 2 * I), torch.float32, self.x.device) if splits > 1 else None

    def quantize_input(self, x_fp8: Optional[torch.Tensor] = None, x_scale: Optional[torch.Tensor] = None,
                       beside_alignment: bool = False) -> None:
        """GEMM1's A operand: x; for fp8 experts its 1x128-group quantisation, given or computed
        here (per (token, slot) pair when the routing weight scales the input). beside_alignment:
        the alignment kernel was launched just before (and lets its dependents start): quantise
        alongside it (fp8_act_quant_kernel.PDL_BESIDE_PREVIOUS)."""
        if not self.experts.fp8:
            return
        if x_fp8 is not None and not self.weight_on_input:
            self.a, self.a_scale = x_fp8, x_scale
            return
        M, H = self.x.shape
        rows = self.topk_ids.numel() if self.weight_on_input else M
        self.a = _buffer((rows, H), FP8_DTYPE, self.x.device)
        self.a_scale = _buffer((rows, triton.cdiv(H, FP8_BLOCK)), torch.float32, self.x.device)
        self._quantize_rows(self.x, self.a, self.a_scale, self.topk_ids.shape[1] if self.weight_on_input else 1,
                            scale_rows=self.weight_on_input, after_gemm=False, beside_alignment=beside_alignment)
        if self.weight_on_input:
            self.a_row_divisor = 1  # GEMM1 reads row `pair`, already scaled

    def prepare_h(self) -> None:
        """GEMM2's A operand: h from a split GEMM1's sums, and for fp8 experts its quantisation
        (h_fp8, h_scale), unless GEMM1 already did it."""
        if self.gemm1_sums is not None:
            self._combine_gemm1_splits()
        elif self.experts.fp8 and not self.h_quantized:
            self._quantize_rows(self.h, self.h_fp8, self.h_scale, 1, scale_rows=False, after_gemm=True)
        else:
            return
        self.h_prepared_by_launch = True

    def _combine_gemm1_splits(self) -> None:
        I = self.h.shape[1]
        grid, per_program = _row_group_grid(self.h.shape[0], I)
        expert_map = self.experts.expert_map
        ids = self.topk_ids.contiguous()
        hq, hs = (self.h_fp8, self.h_scale) if self.experts.fp8 else (self.h, self.pair_weights)
        gemm1_combine_kernel[grid](
            self.gemm1_sums, self.h, hq, hs, ids, expert_map if expert_map is not None else ids,
            self.topk_ids.numel(), I, self.gemm1_sums.stride(0), self.gemm1_sums.stride(1),
            self.h.stride(0), hq.stride(0), hs.stride(0), SPLITS=self.gemm1_splits,
            GROUPS=per_program, GROUP=FP8_BLOCK, QUANT=self.experts.fp8, ONLY_LOCAL_ROWS=expert_map is not None,
            PDL=self.small_launches_dependent, num_warps=4,
            **pdl_launch(self.small_launches_dependent),
        )

    def _quantize_rows(self, src, q, scale, rows_per_token, scale_rows: bool, after_gemm: bool,
                       beside_alignment: bool = False) -> None:
        """h after GEMM1 (after_gemm) waits for it; x may run beside the alignment launched just before."""
        K = src.shape[1]
        grid, per_program = _row_group_grid(q.shape[0], K)
        pdl = fp8_act_quant.PDL_OFF
        if self.small_launches_dependent and after_gemm:
            pdl = fp8_act_quant.PDL_READS_PREVIOUS
        elif self.small_launches_dependent and beside_alignment:
            pdl = fp8_act_quant.PDL_BESIDE_PREVIOUS
        expert_map = self.experts.expert_map if after_gemm else None  # h: GEMM1 wrote local pairs only
        ids = self.topk_ids.contiguous()  # row p of h is pair p = token * top_k + slot
        fp8_act_quant.fp8_act_quant_kernel[grid](
            src, self.pair_weights, q, scale, ids, expert_map if expert_map is not None else ids,
            self.topk_ids.numel(), K, rows_per_token, *src.stride(), q.stride(0), scale.stride(0),
            SCALE_ROWS=scale_rows, GROUPS=per_program, GROUP=FP8_BLOCK, PDL=pdl,
            ONLY_LOCAL_ROWS=expert_map is not None, num_warps=4, **pdl_launch(pdl != fp8_act_quant.PDL_OFF),
        )

    def gemm1(self, config: ExpertConfig) -> None:
        M, H = self.x.shape
        I = self.experts.w_gate.shape[1]
        g = config.gemm1
        if g.split_k != self.gemm1_splits:
            raise ValueError("buffers were allocated for another GEMM1 split_k")
        tiles = self._work_tiles(config)
        items = tiles * triton.cdiv(I, g.block_n) * g.split_k
        grid = max(1, min(items, self.num_sms * g.programs_per_sm))
        quant_h = (self.experts.fp8 and FUSED_H_QUANT and not self.on_side_stream and g.block_n <= FP8_BLOCK
                   and g.split_k == 1)
        unused = self.pair_weights.view(1, 1, self.pair_weights.numel())
        sums = self.gemm1_sums if self.gemm1_sums is not None else unused
        tickets = _ticket_buffer(self.x.device, tiles * triton.cdiv(I, FP8_BLOCK)) if quant_h else self.pair_weights
        operands, constants = self._gemm1_operands(config)
        expert_gemm1_kernel[(grid,)](
            *operands, self.partial, tickets,
            sums, sums.stride(0), sums.stride(1), g.split_k, self._k_per_split(g, H), *self.alignment,
            self.topk_ids.numel(), self.a_row_divisor, M, I, H, self._zero_numel(),
            **constants, BLOCK_N=g.block_n, BLOCK_K=g.block_k, SUB_K=self._sub_k(g), SWAP_AB=g.swap_ab,
            QUANT_H=quant_h, EVEN_N=I % g.block_n == 0, EVEN_K=H % g.block_k == 0, SPLIT_OUT=g.split_k > 1,
            ZERO_BLOCK=ZERO_BLOCK, LAUNCH_DEPENDENTS=self.small_launches_dependent, num_warps=g.num_warps,
            num_stages=g.num_stages,
        )
        self.h_quantized = quant_h

    def gemm2(self, config: ExpertConfig) -> None:
        H = self.x.shape[1]
        I = self.experts.w_gate.shape[1]
        g = config.gemm2
        M = self.x.shape[0]
        items = self._work_tiles(config) * triton.cdiv(H, g.block_n) * g.split_k
        grid = max(1, min(items, self.num_sms * g.programs_per_sm))
        a, a_scale = (self.h_fp8, self.h_scale) if self.experts.fp8 else (self.h, self.scales[2][0])
        operands, constants = self._gemm2_operands(config)
        pdl = self.pdl == "h+gemm2" and self.h_prepared_by_launch
        expert_gemm2_kernel[(grid,)](
            a, a_scale, self.pair_weights, self.gate_partial, *a.stride(), *a_scale.stride(),
            *operands, *self.alignment, self.topk_ids.numel(), self.topk_ids.shape[1], M, H, I,
            **constants, BLOCK_N=g.block_n, BLOCK_K=g.block_k, SUB_K=self._sub_k(g), SWAP_AB=g.swap_ab,
            EVEN_N=H % g.block_n == 0, EVEN_K=I % g.block_k == 0,
            USE_PDL=pdl, LAUNCH_DEPENDENTS=self.small_launches_dependent,
            num_warps=g.num_warps, num_stages=g.num_stages, **pdl_launch(pdl),
        )

    def _gemm1_operands(self, config: ExpertConfig):
        """GEMM1's tensors and strides (expert_gemm1_kernel's leading arguments) and its
        constexprs that do not depend on the tile sizes."""
        e, (sg, su, _) = self.experts, self.scales
        se, (ssg, ssu, _) = (self.shared.experts if self.shared is not None else e), self.shared_scales
        gated = self.shared is not None and self.shared.gate is not None
        if gated:  # one partial dot of the gate logit per K block of GEMM1, summed by GEMM2
            self.gate_partial = _buffer((triton.cdiv(self.x.shape[1], config.gemm1.block_k), self.x.shape[0]),
                                        torch.float32, self.x.device)
        hq, hs = (self.h_fp8, self.h_scale) if e.fp8 else (self.h, self.pair_weights)
        operands = (
            self.a, self.a_scale, self.pair_weights,
            e.w_gate, e.w_up, sg, su,
            se.w_gate, se.w_up, ssg, ssu,
            self.x, self.shared.gate if gated else self.pair_weights, self.gate_partial,
            self.h, hq, hs,
            *self.a.stride(), *_stride2(self.a_scale),
            *e.w_gate.stride(), *e.w_up.stride(), *sg.stride(), *su.stride(),
            *se.w_gate.stride(), *se.w_up.stride(), *ssg.stride(), *ssu.stride(),
            *self.x.stride(), self.h.stride(0), hq.stride(0), hs.stride(0),
        )
        constants = dict(BLOCK_M=config.block_m, A_MODE=A_FP8 if e.fp8 else A_MODEL_DTYPE,
                         WEIGHT_ON_INPUT=self.weight_on_input and not e.fp8, N_SHARED=self.n_shared,
                         SHARED_GATE=gated, DENSE_ALIGNMENT=self.dense_alignment)
        return operands, constants

    def _gemm2_operands(self, config: ExpertConfig):
        """GEMM2's weights, output and strides (the middle arguments of expert_gemm2_kernel) and
        its constexprs that do not depend on the tile sizes; after gemm1 (it reads gate_partial)."""
        g = config.gemm2
        if g.split_k != self.split_k:
            raise ValueError("buffers were allocated for another split_k")
        sd, ssd = self.scales[2], self.shared_scales[2]
        swd = self.shared.experts.w_down if self.shared is not None else self.experts.w_down
        gated = self.shared is not None and self.shared.gate is not None
        gate_parts = self.gate_partial.shape[0] if gated else 1
        operands = (
            self.experts.w_down, sd, swd, ssd, self.partial,
            g.split_k, self._k_per_split(g, self.experts.w_gate.shape[1]), gate_parts,
            *self.experts.w_down.stride(), *sd.stride(), *swd.stride(), *ssd.stride(),
            self.partial.stride(0) if self.deterministic else 0, self.x.shape[1],
        )
        constants = dict(BLOCK_M=config.block_m, A_MODE=A_FP8 if self.experts.fp8 else A_MODEL_DTYPE,
                         APPLY_WEIGHT=not self.weight_on_input,
                         DETERMINISTIC=self.deterministic, N_SHARED=self.n_shared, SHARED_GATE=gated,
                         GATE_PARTS=triton.next_power_of_2(gate_parts), MODEL_DTYPE=_TL_DTYPES[self.x.dtype],
                         DENSE_ALIGNMENT=self.dense_alignment)
        return operands, constants

    def _work_tiles(self, config: ExpertConfig) -> int:
        """Static bound on token tiles: the alignment's, then the shared experts' dense tail."""
        return self.alignment[1].numel() + self.n_shared * triton.cdiv(self.x.shape[0], config.block_m)

    def _sub_k(self, g) -> int:
        """K width of one dot: the 128-wide scale group for fp8 (a K step may hold several)."""
        return FP8_BLOCK if self.experts.fp8 else g.block_k

    def _zero_numel(self) -> int:
        return 0 if self.deterministic else self.partial.numel()  # GEMM2's atomic accumulator

    @staticmethod
    def _k_per_split(g, K: int) -> int:
        return triton.cdiv(triton.cdiv(K, g.split_k), g.block_k) * g.block_k

    def finalize(self) -> torch.Tensor:
        if not self.deterministic:
            return self.partial if self.out_dtype == torch.float32 else self.partial.to(self.out_dtype)
        M, H = self.x.shape
        top_k = self.topk_ids.shape[1]
        ids = self.topk_ids.to(torch.int32).contiguous()
        emap = self.experts.expert_map
        moe_finalize_kernel[(M, triton.cdiv(H, FINALIZE_BLOCK_N))](
            self.partial, self.out, ids, emap if emap is not None else ids,
            M, H, self.partial.stride(0), H, self.out.stride(0),
            TOP_K=top_k, SPLIT_K=self.split_k, HAS_EXPERT_MAP=emap is not None, N_SHARED=self.n_shared,
            BLOCK_N=FINALIZE_BLOCK_N,
            num_warps=4,
        )
        return self.out


# device -> zeroed int32 counters (GEMM1's h-quantisation tickets); every launch leaves them zero.
_tickets: Dict[Tuple[torch.device, str], torch.Tensor] = {}
_retired_tickets: list = []


def _ticket_buffer(device: torch.device, numel: int) -> torch.Tensor:
    """Zeroed counters that the kernels re-arm after use, so no launch zeroes them per call.

    Eager launches get one set per (device, stream); CUDA graphs use one set per device, made by an
    eager call before capture (a capture that finds none, or too few, zeroes fresh ones inside
    the graph). Two launches running at the same time on different streams, or two graph replays
    at the same time, must not share a set: eager ones do not; concurrent replays of graphs that
    contain this layer are not supported. Buffers are never freed (a captured graph may use them).
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        keys = [(device, "graph")]
    else:
        stream = str(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else "cpu"
        keys = [(device, stream), (device, "graph")]
    for key in keys:
        old = _tickets.get(key)
        if old is None or old.numel() < numel:
            size = max(numel, 2 * old.numel() if old is not None else 0)
            if capturing:
                return torch.zeros(size, dtype=torch.int32, device=device)
            fresh = made_outside_graph_pools(lambda: torch.zeros(size, dtype=torch.int32, device=device), device)
            if old is not None:
                _retired_tickets.append(old)
            _tickets[key] = fresh
    return _tickets[keys[0]]


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _buffer(shape, dtype, device) -> torch.Tensor:
    """Every intermediate and output buffer (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _row_group_grid(rows: int, K: int):
    """Grid and groups per program of the per-row 1x128-group kernels (expert_tiles.row_groups)."""
    groups = triton.cdiv(K, FP8_BLOCK)
    per_program = min(8, triton.next_power_of_2(groups))
    return (rows, triton.cdiv(groups, per_program)), per_program


def _scales(e: ExpertTensors):
    if e.fp8:
        return e.w_gate_scale, e.w_up_scale, e.w_down_scale
    dummy = torch.empty((1, 1, 1), dtype=torch.float32, device=e.w_gate.device)  # unused by the kernels
    return dummy, dummy, dummy


def _stride2(t: torch.Tensor):
    return t.stride() if t.dim() == 2 else (0, 0)


def _kernels_can_run(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check(x, topk_ids, topk_weights, e: ExpertTensors, H: int, I: int) -> None:
    if not _kernels_can_run(x):
        raise Unsupported(f"tensors on {x.device}: the kernels run on CUDA (or under TRITON_INTERPRET=1)")
    if x.dim() != 2:
        raise Unsupported(f"x must be [M, H], got {tuple(x.shape)}")
    if x.dtype not in MODEL_DTYPES:
        raise Unsupported(f"model dtype {x.dtype}: the expert kernels take bf16/fp16 activations")
    M = x.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise Unsupported(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                          f"do not match M = {M}")
    E = e.num_local
    for name, t, shape in (("w_gate", e.w_gate, (E, I, H)), ("w_up", e.w_up, (E, I, H)), ("w_down", e.w_down, (E, H, I))):
        if tuple(t.shape) != shape:
            raise Unsupported(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != (FP8_DTYPE if e.fp8 else x.dtype):
            raise Unsupported(f"{name} is {t.dtype}; expected {FP8_DTYPE if e.fp8 else x.dtype}")
        if t.device != x.device:
            raise Unsupported(f"{name} is on {t.device}, x on {x.device}")
        if t[0].numel() and sum((s - 1) * st for s, st in zip(t.shape[1:], t.stride()[1:])) > INT32_MAX:
            raise Unsupported(f"one expert of {name} spans more than 2**31 elements")
    if e.fp8:
        for name, t in (("w_gate_scale", e.w_gate_scale), ("w_up_scale", e.w_up_scale), ("w_down_scale", e.w_down_scale)):
            if t is None or t.dtype != torch.float32 or t.dim() != 3:
                raise Unsupported(f"fp8 experts need fp32 {name} [E, N/128, K/128]")
    if e.expert_map is not None and e.expert_map.numel() != e.num_global:
        raise Unsupported(f"expert_map has {e.expert_map.numel()} entries for {e.num_global} experts")


def _check_shared(x, e: ExpertTensors, shared: SharedTail, weight_on_input: bool, H: int, I: int) -> None:
    if weight_on_input:
        raise Unsupported("shared experts as a dense tail need the routing weight on the output")
    s = shared.experts
    if s.fp8 != e.fp8:
        raise Unsupported("shared chunks and routed experts must both be fp8 or both not")
    n = s.num_local
    for name, t, shape in (("gate", s.w_gate, (n, I, H)), ("up", s.w_up, (n, I, H)), ("down", s.w_down, (n, H, I))):
        if tuple(t.shape) != shape or t.dtype != e.w_gate.dtype or t.device != x.device:
            raise Unsupported(f"shared {name} chunks are {tuple(t.shape)} {t.dtype} on {t.device}; "
                              f"expected {shape} {e.w_gate.dtype} on {x.device}")
    if shared.gate is not None and (tuple(shared.gate.shape) != (H,) or shared.gate.stride(0) != 1
                                    or shared.gate.dtype != x.dtype or shared.gate.device != x.device):
        raise Unsupported(f"shared_expert_gate must be a contiguous [{H}] {x.dtype} vector on {x.device}")
    if e.fp8:
        for name in ("w_gate_scale", "w_up_scale", "w_down_scale"):
            t = getattr(s, name)
            if t is None or t.dtype != torch.float32 or t.dim() != 3:
                raise Unsupported(f"fp8 shared chunks need fp32 {name} [n, N/128, K/128]")


def _check_int32(num_pairs: int, H: int, I: int, split_k: int, gemm1_splits: int) -> None:
    if max(num_pairs * I, split_k * num_pairs * H, gemm1_splits * num_pairs * 2 * I) > INT32_MAX:
        raise Unsupported(f"{num_pairs} pairs x {max(H, I)} exceeds int32 index math")
