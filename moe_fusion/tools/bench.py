"""``moe-fusion bench``: decode latency of a MoE layer at M = 1..64 tokens, eager vs Inductor vs moe_fusion.

Method (DESIGN.md "Measuring"): random weights and inputs (never zeros), CUDA-graph replay timing
with rotated input sets, kernels per call from the profiler, and for the weight-bound parts the
fraction of the device-to-device copy bandwidth measured in the same run. Touched bytes are the
weights a call must read: the distinct local experts its routing hits times the bytes of one
expert, plus the router/norm weights (preamble, layer) and the shared expert (layer); the HBM
floor is those bytes over the copy bandwidth.

Baselines are plain-PyTorch modules of the same layer (``bench_layers``), run eagerly and under
``torch.compile`` (Inductor, default options: M=1 compiles static, the next M recompiles with M
dynamic). ``moe_fusion`` calls the custom op (whole layer) or ``lowering.dispatch`` (the preamble as
the layer runs it, aligned for its expert tiles; the experts alone), so it times whatever path
dispatch takes. The baselines' preamble has no alignment (their expert part sorts the tokens), so
moe_fusion's preamble does more work than theirs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..lowering import layer as layer_plan
from ..spec import MoESpec
from . import bench_layers, bench_report
from .bench_layers import SHAPES, SMOKE_SHAPES

PARTS = ("preamble", "experts", "layer")
DTYPES = {"bf16": "none", "fp8": "fp8_block"}  # bench dtype -> MoESpec.quant; activations are bf16
VARIANTS = ("eager", "inductor", "moe_fusion", "backend")
DEFAULT_M = (1, 2, 4, 8, 16, 32, 64)
# The preamble's weights fit in L2 many times over, so its timed calls rotate over enough weight
# copies that together they exceed the L2 this many times.
L2_ROTATION_FACTOR = 3
MAX_PREAMBLE_COPIES = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default=None,
                   help=f"comma-separated shapes: {', '.join(SHAPES)}, or custom (sizes below); "
                        "default dsv3 (tiny,tiny-ep with --cpu)")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="tokens per step, comma-separated")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: preamble, experts, layer")
    p.add_argument("--dtype", default="bf16", help="expert weights, comma-separated: bf16 or fp8 (128x128 blocks)")
    p.add_argument("--variants", default=None,
                   help="comma-separated from eager, inductor, moe_fusion, backend (torch.compile with the "
                        "moe_fusion backend); default eager,inductor,moe_fusion (eager,moe_fusion with --cpu)")
    p.add_argument("--json", metavar="PATH", help="write all rows and the run's metadata as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument("--plot", metavar="PATH.png", help="plot latency against M per variant (needs matplotlib)")
    p.add_argument("--summary-m", default=None,
                   help="print a compact table at these Ms (comma-separated) after the full table")
    p.add_argument("--from-json", metavar="PATHS",
                   help="measure nothing: merge these comma-separated JSON results and report them")
    p.add_argument("--cpu", action="store_true",
                   help="tiny smoke run on the CPU with wall-clock timing (not a GPU measurement)")
    p.add_argument("--sets", type=int, default=8,
                   help="rotated input sets per timing, each with its own routing (default 8; the preamble "
                        "uses more, with weight copies, to get out of L2)")
    p.add_argument("--seconds-per-point", type=float, default=0.25,
                   help="target timed seconds per (variant, M) point (default 0.25)")
    p.add_argument("--variant-budget", type=float, default=60.0,
                   help="wall seconds one variant may spend on one (shape, dtype, part); later Ms are "
                        "skipped with a note once spent (default 60)")
    p.add_argument("--max-call-ms", type=float, default=1000.0,
                   help="skip a point whose single call takes longer than this (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    custom = p.add_argument_group("custom shape (--shape custom)")
    custom.add_argument("--hidden", type=int)
    custom.add_argument("--experts", type=int)
    custom.add_argument("--local-experts", type=int, default=0, help="expert parallelism: experts on this rank")
    custom.add_argument("--top-k", type=int)
    custom.add_argument("--intermediate", type=int)
    custom.add_argument("--shared-intermediate", type=int, default=0)
    custom.add_argument("--scoring", choices=("softmax", "sigmoid"), default="softmax")
    custom.add_argument("--n-group", type=int, default=1)
    custom.add_argument("--topk-group", type=int, default=1)
    custom.add_argument("--routed-scale", type=float, default=1.0)
    custom.add_argument("--correction-bias", action="store_true")
    custom.add_argument("--rms-norm", action="store_true")
    custom.add_argument("--router-fp32", action="store_true")
    custom.add_argument("--no-renormalize", action="store_true")


# --------------------------------------------------------------------------- configuration
@dataclass
class Config:
    device: torch.device
    shapes: List[str]
    ms: List[int]
    parts: List[str]
    dtypes: List[str]
    variants: List[str]
    sets: int
    seconds_per_point: float
    variant_budget: float
    max_call_ms: float
    seed: int
    custom: Optional[MoESpec] = None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _choose(values: Sequence[str], allowed: Sequence[str], what: str) -> List[str]:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"moe-fusion bench: unknown {what} {bad or values}; expected some of {list(allowed)}")
    return list(values)


def custom_spec(args) -> MoESpec:
    missing = [f"--{n}" for n in ("hidden", "experts", "top_k", "intermediate") if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"moe-fusion bench: --shape custom needs {' '.join(m.replace('_', '-') for m in missing)}")
    return MoESpec(
        hidden_size=args.hidden, num_experts=args.experts, num_local_experts=args.local_experts, top_k=args.top_k,
        intermediate_size=args.intermediate, shared_intermediate_size=args.shared_intermediate,
        scoring=args.scoring, n_group=args.n_group, topk_group=args.topk_group,
        routed_scaling_factor=args.routed_scale, correction_bias=args.correction_bias, rms_norm=args.rms_norm,
        router_fp32=args.router_fp32, renormalize=not args.no_renormalize,
        renormalize_eps=1e-20 if args.correction_bias else 0.0, dtype="bfloat16",
    )


def make_config(args) -> Config:
    device = torch.device("cpu" if args.cpu else "cuda")
    shapes = _split(args.shape or (",".join(SMOKE_SHAPES) if args.cpu else "dsv3"))
    shapes = _choose(shapes, (*SHAPES, "custom"), "shape")
    if args.cpu:
        big = [s for s in shapes if s not in (*SMOKE_SHAPES, "custom")]
        if big:
            raise SystemExit(f"moe-fusion bench: {big} are too big for the CPU smoke run; use "
                             f"{', '.join(SMOKE_SHAPES)} or a small custom shape")
    default_variants = "eager,moe_fusion" if args.cpu else "eager,inductor,moe_fusion"
    try:
        ms = sorted({int(m) for m in _split(args.m)})
    except ValueError:
        raise SystemExit(f"moe-fusion bench: --m takes comma-separated integers, got {args.m!r}")
    if not ms or ms[0] < 1:
        raise SystemExit(f"moe-fusion bench: --m needs integers >= 1, got {args.m!r}")
    return Config(
        device=device, shapes=shapes, ms=ms, parts=_choose(_split(args.parts), PARTS, "part"),
        dtypes=_choose(_split(args.dtype), tuple(DTYPES), "dtype"),
        variants=_choose(_split(args.variants or default_variants), VARIANTS, "variant"),
        sets=max(1, args.sets), seconds_per_point=args.seconds_per_point, variant_budget=args.variant_budget,
        max_call_ms=args.max_call_ms, seed=args.seed, custom=custom_spec(args) if "custom" in shapes else None,
    )


def shape_spec(cfg: Config, shape: str, dtype: str) -> MoESpec:
    base = cfg.custom if shape == "custom" else SHAPES[shape]
    return base.replace(quant=DTYPES[dtype], dtype="bfloat16")


# --------------------------------------------------------------------------- timing
def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    us: Optional[float] = None
    kernel_names: Optional[List[str]] = None  # in launch order (GPU only)
    first_call_s: Optional[float] = None
    note: str = ""

    @property
    def kernels(self) -> Optional[int]:
        return None if self.kernel_names is None else len(self.kernel_names)


def time_point(cfg: Config, fn: Callable, input_sets: Sequence[tuple]) -> Timing:
    """Warm up (compiles), estimate one call, then time it: CUDA-graph replays on GPU, wall clock on CPU."""
    from . import timing

    t0 = time.perf_counter()
    fn(*input_sets[0])
    _sync(cfg.device)
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for inputs in input_sets:
        fn(*inputs)
    _sync(cfg.device)
    call_s = (time.perf_counter() - t0) / len(input_sets)  # an upper bound: includes launch overhead
    if call_s * 1e3 > cfg.max_call_ms:
        return Timing(first_call_s=first_call_s,
                      note=f"skipped: one call takes ~{call_s * 1e3:.0f} ms (> --max-call-ms {cfg.max_call_ms:g})")
    batches = 7 if call_s * len(input_sets) * 7 < cfg.seconds_per_point else 3
    replays = max(1, min(20, int(cfg.seconds_per_point / (batches * len(input_sets) * call_s))))
    if cfg.on_gpu:
        us = timing.graph_replay_us(fn, input_sets, replays=replays, batches=batches)
        names = timing.kernel_names_per_call(fn, input_sets[0])
    else:
        us, names = wall_clock_us(fn, input_sets, replays, batches), None
    return Timing(us=us, kernel_names=names, first_call_s=first_call_s)


def wall_clock_us(fn: Callable, input_sets: Sequence[tuple], replays: int, batches: int) -> float:
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(replays):
            for inputs in input_sets:
                fn(*inputs)
        samples.append((time.perf_counter() - t0) * 1e6 / (replays * len(input_sets)))
    return statistics.median(samples)


def device_bandwidths(cfg: Config) -> dict:
    """Bytes/s ceilings measured in this run. ``copy`` (read + write), the one fractions are held to,
    is the faster of a memcpy (timing.copy_bandwidth_bytes_per_s) and an elementwise copy kernel:
    on an H100 the memcpy alone measured 2.43 TB/s, below what grouped GEMMs read weights at.
    ``read`` is a pure-read reduction, kept for reference since weight streaming is read-only."""
    from . import timing

    if not cfg.on_gpu:
        src = torch.randn(1 << 24)  # 64 MB
        dst = torch.empty_like(src)
        us = wall_clock_us(lambda: dst.copy_(src), [()], replays=5, batches=5)
        copy = 2 * src.numel() * src.element_size() / (us * 1e-6)
        return dict(copy=copy, memcpy=copy)
    memcpy = timing.copy_bandwidth_bytes_per_s()
    src = torch.randn(1 << 29, device=cfg.device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    kernel_us = timing.graph_replay_us(lambda: torch.neg(src, out=dst), [()], replays=5, batches=5)
    read_us = timing.graph_replay_us(lambda: torch.sum(src, dtype=torch.float32), [()], replays=5, batches=5)
    nbytes = src.numel() * src.element_size()
    kernel_copy = 2 * nbytes / (kernel_us * 1e-6)
    del src, dst
    torch.cuda.empty_cache()
    return dict(copy=max(memcpy, kernel_copy), memcpy=memcpy, kernel_copy=kernel_copy, read=nbytes / (read_us * 1e-6))


# --------------------------------------------------------------------------- one (shape, dtype)
@dataclass
class PartInputs:
    sets: List[tuple]  # baseline calls: (module, *tensors)
    op_sets: List[tuple]  # moe_fusion calls: (*tensors, MoEWeights)
    distinct_experts: float  # mean over the sets of the distinct local experts the routing hits
    bytes: int  # weights one call must read


@dataclass
class Budget:
    limit_s: float
    spent_s: dict = field(default_factory=dict)

    def exhausted(self, key) -> bool:
        return self.spent_s.get(key, 0.0) > self.limit_s

    def charge(self, key, seconds: float) -> None:
        self.spent_s[key] = self.spent_s.get(key, 0.0) + seconds


def distinct_local_experts(spec: MoESpec, topk_idx: torch.Tensor, expert_map: Optional[torch.Tensor]) -> int:
    ids = topk_idx.long().flatten()
    if expert_map is not None:
        ids = expert_map.long()[ids]
        ids = ids[ids >= 0]
    return int(torch.unique(ids).numel())


def copies_beyond_l2(bytes_per_copy: int, l2_bytes: int) -> int:
    """Copies of bytes_per_copy bytes of weights that together exceed L2 L2_ROTATION_FACTOR times."""
    return math.ceil(L2_ROTATION_FACTOR * l2_bytes / bytes_per_copy)


def preamble_copies_beyond_l2(spec: MoESpec, l2_bytes: int) -> int:
    """Copies of the preamble's weights that together exceed L2 L2_ROTATION_FACTOR times."""
    return copies_beyond_l2(bench_layers.preamble_bytes(spec), l2_bytes)


class ShapeBench:
    """The layer of one (shape, dtype), its weights shared by every variant and part."""

    def __init__(self, cfg: Config, spec: MoESpec):
        self.cfg, self.spec = cfg, spec
        self.layer = bench_layers.build_layer(spec, cfg.device, seed=cfg.seed)
        self.weights = bench_layers.canonical_weights(self.layer)
        self.preamble_copies: list = []
        self._generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)

    def preamble_copy_count(self) -> int:
        if not self.cfg.on_gpu:
            return self.cfg.sets
        l2 = torch.cuda.get_device_properties(self.cfg.device).L2_cache_size
        return max(self.cfg.sets, min(MAX_PREAMBLE_COPIES, preamble_copies_beyond_l2(self.spec, l2)))

    def preamble_modules(self, count: int) -> list:
        while len(self.preamble_copies) < count - 1:
            self.preamble_copies.append(copy.deepcopy(self.layer.preamble))
        return [self.layer.preamble, *self.preamble_copies][:count]

    def inputs(self, part: str, m: int) -> PartInputs:
        spec, layer = self.spec, self.layer
        count = self.preamble_copy_count() if part == "preamble" else self.cfg.sets
        xs = [torch.randn(m, spec.hidden_size, generator=self._generator, device=self.cfg.device).to(spec.torch_dtype)
              for _ in range(count)]
        routed = [layer.preamble(x) for x in xs]
        distinct = statistics.mean(
            distinct_local_experts(spec, ids, layer.experts.expert_map) for _, ids, _ in routed)
        per_expert = bench_layers.expert_bytes(spec)
        if part == "preamble":
            mods = self.preamble_modules(count)
            return PartInputs(
                sets=[(mod, x) for mod, x in zip(mods, xs)],
                op_sets=[(x, bench_layers.canonical_weights(layer, mod)) for mod, x in zip(mods, xs)],
                distinct_experts=distinct, bytes=bench_layers.preamble_bytes(spec))
        if part == "experts":
            return PartInputs(
                sets=[(layer.experts, h, ids, w) for h, ids, w in routed],
                op_sets=[(h, ids, w, self.weights) for h, ids, w in routed],
                distinct_experts=distinct, bytes=round(distinct * per_expert))
        return PartInputs(
            sets=[(layer, x) for x in xs], op_sets=[(x, self.weights) for x in xs],
            distinct_experts=distinct, bytes=self.layer_bytes(m, distinct))

    def layer_bytes(self, m: int, distinct_experts: float) -> int:
        """Weights one layer call reads: router and norm, the shared expert as the plan (under the
        current options) reads it, and the routed experts the routing hits."""
        spec = self.spec
        shared_fp8 = spec.has_shared_experts and layer_plan.plan_layer(spec, m, self.cfg.device).shared_fp8
        return (bench_layers.preamble_bytes(spec) + bench_layers.shared_bytes(spec, shared_fp8)
                + round(distinct_experts * bench_layers.expert_bytes(spec)))

    def close(self) -> None:
        self.layer = self.weights = None
        self.preamble_copies.clear()
        gc.collect()
        torch._dynamo.reset()
        if self.cfg.on_gpu:
            torch.cuda.empty_cache()


# One caller per part, so each part's compiled code lives on its own code object and the parts
# do not share Dynamo's per-code recompile limit.
def _call_preamble(mod, x):
    return mod(x)


def _call_experts(mod, hidden_states, topk_idx, topk_weight):
    return mod(hidden_states, topk_idx, topk_weight)


def _call_layer(mod, x):
    return mod(x)


CALLERS = {"preamble": _call_preamble, "experts": _call_experts, "layer": _call_layer}


def moe_fusion_fn(spec: MoESpec, part: str) -> Callable:
    """The function the moe_fusion variant times for one part."""
    from .. import ops
    from ..lowering import dispatch

    if part == "preamble":  # with the alignment the layer's expert block reads (the op has none)
        return lambda x, w: dispatch.moe_preamble(spec, x, w, as_in_layer=True)
    if part == "experts":
        return lambda h, ids, weights, w: dispatch.routed_experts(spec, h, ids, weights, w)
    return lambda x, w: ops.call_moe_layer(spec, x, w)


def baseline_fn(variant: str, part: str) -> Callable:
    """The function a baseline variant times; compiled ones compile on their first call."""
    caller = CALLERS[part]
    if variant == "eager":
        return caller
    if variant == "inductor":
        return torch.compile(caller)
    from ..backend import moe_fusion_backend

    return torch.compile(caller, backend=moe_fusion_backend)


# A token whose own output is off by more than this is counted as routed differently; fp8 experts
# round activations to e4m3 (~4% per token), the fp8 baselines do not.
TOKEN_OFF = {"none": 0.05, "fp8_block": 0.2}


def _per_token(part: str, out, spec: MoESpec):
    """(all outputs, the per-token rows to check) as fp32 [M, *]; the top-k order does not matter."""
    if part != "preamble":
        return out.float(), out.float()
    normed, ids, weights = out[0], out[-2], out[-1]
    routing = torch.zeros(ids.shape[0], spec.num_experts, device=ids.device).scatter_(1, ids.long(), weights.float())
    return torch.cat([normed.float(), routing], dim=1), routing


def compare(part: str, out, expected, spec: MoESpec) -> Tuple[float, float]:
    """Relative error of the whole output, and the fraction of tokens off by more than TOKEN_OFF.

    A near-tie in the router can send one token to another expert when rounding differs (Inductor
    fuses the norm and router), which moves that token's output by ~1/top_k and the whole-tensor
    error by up to tens of percent at small M; the token fraction tells that apart from a wrong
    kernel, which moves every token."""
    (a, a_rows), (b, b_rows) = _per_token(part, out, spec), _per_token(part, expected, spec)
    whole = float((a - b).norm() / b.norm().clamp_min(1e-30))
    row_err = (a_rows - b_rows).norm(dim=1)
    off = row_err > TOKEN_OFF[spec.quant] * b_rows.norm(dim=1)
    return whole, float(off.float().mean())


def bench_shape(cfg: Config, shape: str, dtype: str, copy_bw: float, rows: list, counter: list,
                after_part: Callable[[], None] = lambda: None) -> None:
    spec = shape_spec(cfg, shape, dtype)
    if cfg.on_gpu:
        free, _ = torch.cuda.mem_get_info()
        need = bench_layers.layer_weight_bytes(spec)
        if need > 0.9 * free:
            note = f"skipped: weights need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
            progress(f"{shape} {dtype}: {note}")
            for part in cfg.parts:
                for m in cfg.ms:
                    rows.extend(_row(shape, dtype, part, m, v, spec, note=note) for v in cfg.variants)
            return
    progress(f"{shape} {dtype}: building weights ({bench_layers.layer_weight_bytes(spec) / 1e9:.2f} GB)")
    bench = ShapeBench(cfg, spec)
    try:
        for part in cfg.parts:
            fns = {v: (moe_fusion_fn(spec, part) if v == "moe_fusion" else baseline_fn(v, part)) for v in cfg.variants}
            failed = {}
            budget = Budget(cfg.variant_budget)
            for m in cfg.ms:
                inputs = bench.inputs(part, m)
                expected = CALLERS[part](*inputs.sets[0])
                for variant in cfg.variants:
                    counter[0] += 1
                    row = _row(shape, dtype, part, m, variant, spec, inputs, copy_bw)
                    if variant in failed:
                        row["note"] = failed[variant]
                    elif budget.exhausted(variant):
                        row["note"] = f"skipped: variant budget of {cfg.variant_budget:g} s spent on smaller M"
                    else:
                        _measure_into(row, cfg, part, spec, fns[variant], inputs, expected, variant, failed, budget)
                    rows.append(row)
                    progress(_progress_line(counter, row))
                del inputs
            after_part()
    finally:
        bench.close()


def _measure_into(row, cfg, part, spec, fn, inputs, expected, variant, failed, budget) -> None:
    sets = inputs.op_sets if variant == "moe_fusion" else inputs.sets
    t0 = time.perf_counter()
    try:
        result = time_point(cfg, fn, sets)
        row["rel_err_vs_eager"], row["tokens_off_vs_eager"] = compare(part, fn(*sets[0]), expected, spec)
    except Exception as e:  # a compile failure or an out-of-memory is a row note, not a crash
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        note = f"failed: {type(e).__name__}: {first_line}"
        if variant in ("inductor", "backend") or isinstance(e, torch.OutOfMemoryError):
            failed[variant] = note
        row["note"] = note
        progress(f"{variant} failed on {row['shape']} {row['dtype']} {part} M={row['m']}:\n{traceback.format_exc()}")
        if cfg.on_gpu:
            torch.cuda.empty_cache()
        budget.charge(variant, time.perf_counter() - t0)
        return
    # Compilation is not charged: the budget is there to stop slow timings, not compiles.
    budget.charge(variant, time.perf_counter() - t0 - result.first_call_s)
    row["us"], row["kernels"], row["first_call_s"] = result.us, result.kernels, result.first_call_s
    if result.kernel_names is not None:
        row["kernel_names"] = result.kernel_names
    if result.note:
        row["note"] = result.note
    if row["us"] is not None:
        row["frac_copy_bw"] = row["floor_us"] / row["us"]


def _row(shape, dtype, part, m, variant, spec, inputs: Optional[PartInputs] = None, copy_bw=None, note=""):
    row = dict(shape=shape, dtype=dtype, part=part, m=m, variant=variant, us=None, kernels=None,
               distinct_experts=None, bytes=None, floor_us=None, frac_copy_bw=None, rel_err_vs_eager=None, tokens_off_vs_eager=None,
               first_call_s=None, note=note, local_experts=spec.num_local_experts)
    if inputs is not None:
        row.update(distinct_experts=inputs.distinct_experts, bytes=inputs.bytes,
                   floor_us=inputs.bytes / copy_bw * 1e6)
    return row


def _progress_line(counter, row) -> str:
    head = f"[{counter[0]:4d}] {row['shape']} {row['dtype']} {row['part']} M={row['m']} {row['variant']}:"
    if row["us"] is None:
        return f"{head} {row['note']}"
    kernels = "" if row["kernels"] is None else f", {row['kernels']} kernels"
    err = ("" if row["rel_err_vs_eager"] is None else
           f", rel err {row['rel_err_vs_eager']:.1e} ({row['tokens_off_vs_eager']:.0%} of tokens off)")
    return f"{head} {row['us']:.1f} us{kernels}{err} (first call {row['first_call_s']:.1f} s)"


# --------------------------------------------------------------------------- run
def run_metadata(cfg: Config, bandwidths: dict) -> dict:
    import triton

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        argv=sys.argv[1:], copy_bandwidth_bytes_per_s=bandwidths["copy"],
        **{f"{name}_bandwidth_bytes_per_s": value for name, value in bandwidths.items() if name != "copy"},
        timing="cuda_graph_replay" if cfg.on_gpu else "wall_clock_cpu (a smoke run, not a GPU measurement)",
        shapes={s: dataclasses.asdict(cfg.custom if s == "custom" else SHAPES[s]) for s in cfg.shapes},
        ms=cfg.ms, parts=cfg.parts, dtypes=cfg.dtypes, variants=cfg.variants, input_sets=cfg.sets,
    )
    if cfg.on_gpu:
        props = torch.cuda.get_device_properties(cfg.device)
        meta.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    l2_bytes=props.L2_cache_size, memory_bytes=props.total_memory)
    else:
        meta.update(device=f"cpu ({platform.processor() or platform.machine()})")
    return meta


def _recompile_limit_name() -> str:
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def measure(cfg: Config, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """All rows of the configured run; ``checkpoint`` gets the result so far after each (shape, dtype, part)."""
    torch.manual_seed(cfg.seed)
    if cfg.on_gpu:
        progress(f"moe-fusion bench on {torch.cuda.get_device_name()}: measuring the copy bandwidth")
    else:
        progress("moe-fusion bench --cpu: a smoke run with wall-clock timing, NOT a GPU measurement")
    bandwidths = device_bandwidths(cfg)
    copy_bw = bandwidths["copy"]
    progress("bandwidths (TB/s; copies count read + write): "
             + ", ".join(f"{name} {value / 1e12:.3f}" for name, value in bandwidths.items()))
    rows: list = []
    counter = [0]
    t0 = time.perf_counter()

    def save_partial():
        if checkpoint is not None:
            checkpoint(dict(meta=dict(run_metadata(cfg, bandwidths), partial=True), rows=rows))

    # A compiled variant that hits Dynamo's recompile limit silently runs eagerly: raise the limit
    # well above what the bench needs (static M=1, dynamic M, per part; fp8 guards on the slot count).
    with torch.no_grad(), torch._dynamo.config.patch(**{_recompile_limit_name(): 64}):
        for shape in cfg.shapes:
            for dtype in cfg.dtypes:
                bench_shape(cfg, shape, dtype, copy_bw, rows, counter, after_part=save_partial)
                progress(f"{shape} {dtype} done, {time.perf_counter() - t0:.0f} s elapsed")
    return dict(meta=run_metadata(cfg, bandwidths), rows=rows)


def run(args) -> int:
    if args.from_json:
        result = bench_report.merge([bench_report.load(p) for p in _split(args.from_json)])
    else:
        if not args.cpu and not torch.cuda.is_available():
            print("moe-fusion bench: no CUDA device here, nothing measured "
                  "(--cpu runs a tiny smoke version on the CPU)", file=sys.stderr)
            return 0
        # The JSON is rewritten after each part, so a run cut short still leaves what it finished.
        result = measure(make_config(args), checkpoint=(lambda r: bench_report.write_json(r, args.json)) if args.json else None)
    bench_report.emit(result, json_path=args.json, markdown_path=args.markdown, plot_path=args.plot,
                      summary_ms=[int(m) for m in _split(args.summary_m)] if args.summary_m else None)
    return 0


def main(argv=None) -> int:
    """``python -m moe_fusion.tools.bench``: the same as ``moe-fusion bench``."""
    parser = argparse.ArgumentParser(prog="moe-fusion bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
