"""A/B of lowering settings inside one process: the whole layer (layer.moe_layer, the plan its
settings give), or with --part preamble its preamble alone, or with --part experts the expert block
alone on the preamble's routings (dispatch.routed_experts: its own alignment and x quantisation), timed as CUDA-graph replays
(moe_fusion.tools.timing, inputs rotated) for each variant, the variants alternated round after
round so that drift in clocks or memory hits each alike. Where the variants differ only in module
attributes this resolves what benchmarks/gpu_ab.sh cannot: one process, one set of weights and
kernels compiled once made its rounds agree to ~0.3 us on the H100, where separate processes
differ by 3-5 us (session 9). Its inputs are gpu_overlap.input_sets, not the bench's routings:
compare its numbers with each other only. With --part preamble the calls rotate over copies of the
router, norm and bias weights that together exceed L2 as often as the bench's do
(bench.L2_ROTATION_FACTOR), so the router weight comes from HBM; until session 14 they did not, and a
64-row router tile that won 0.9 us in the L2-resident A/B won nothing in the bench. The expert part
keeps one weight set, and so does the layer part unless --router-seeds gives each input set a router of
its own: under expert parallelism the layer's time follows how many local experts the routing hits, which
one router sets far from its average (benchmarks/routing_seeds.py); the run prints the hits per M. Its weights
(layer_cases) give rank 0 every 8th expert, so most one-token calls hit one local expert, where the bench's
contiguous block (one DeepSeek group) is hit by none or two: for the expert-parallel layer's A/Bs at the bench's
routing use gpu_layer_by_hits.py --variant (session 20).

    python benchmarks/gpu_layer_ab.py --shape dsv3-ep8 --dtype fp8 --m 1,2,4 --rounds 3 \\
        --variant off:experts.EXPERT_PDL=off --variant h:experts.EXPERT_PDL=h

A variant is NAME:SETTING[,SETTING...], a setting MODULE.ATTR[.ATTR]=VALUE on moe_fusion.lowering
(VALUE a Python literal, else a string), e.g. layer.options.shared_fp8=True. Prints one line per
(round, variant) and, last, each variant's median per M.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import os
import statistics
import sys
from typing import Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu_layer_timeline import routed_sets  # noqa: E402
from gpu_overlap import DTYPES, PREAMBLE_WEIGHTS, input_sets, local_experts_hit  # noqa: E402
from layer_cases import layer_weights, with_new_router, with_own_tensors  # noqa: E402
from moe_fusion.lowering import dispatch, layer, preamble  # noqa: E402
from moe_fusion.tools import bench, timing  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402

Setting = Tuple[object, str, object]  # (object, attribute, value)


def parse_variant(text: str) -> Tuple[str, List[Tuple[str, str]]]:
    name, _, settings = text.partition(":")
    pairs = []
    for setting in filter(None, settings.split(",")):
        target, _, value = setting.partition("=")
        pairs.append((target, value))
    return name, pairs


def resolve(target: str, value: str) -> Setting:
    module, *attrs = target.split(".")
    obj = importlib.import_module(f"moe_fusion.lowering.{module}")
    for attr in attrs[:-1]:
        obj = getattr(obj, attr)
    if not hasattr(obj, attrs[-1]):
        raise AttributeError(f"{target}: no such attribute")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return obj, attrs[-1], parsed


def apply(settings: List[Setting]) -> List[Setting]:
    """Set each attribute; returns the settings that undo it."""
    undo = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in settings]
    for obj, attr, value in settings:
        setattr(obj, attr, value)
    return undo


@contextlib.contextmanager
def applied(settings: List[Setting]):
    """The settings in force inside the block, undone after it."""
    undo = apply(settings)
    try:
        yield
    finally:
        apply(undo)


def preamble_weight_copies(spec, w, l2_bytes: int) -> list:
    """Copies of the preamble's weights (router, norm, bias) as many as the bench's preamble part
    rotates over (bench.preamble_copies_beyond_l2); the expert weights are shared."""
    return [with_own_tensors(w, PREAMBLE_WEIGHTS) for _ in range(bench.preamble_copies_beyond_l2(spec, l2_bytes))]


def layer_sets(spec, M: int, device, weight_sets: list) -> list:
    """(x, normed, weights) per input set, at least 8 sets and one per weight set, going round the weight sets."""
    xs = input_sets(spec, M, device, max(8, len(weight_sets)))
    return [(x, normed, weight_sets[i % len(weight_sets)]) for i, (x, normed) in enumerate(xs)]


def time_variant(spec, weight_sets: list, M: int, device, settings: List[Setting], part: str) -> float:
    """``weight_sets``: the preamble part (preamble_weight_copies) and the layer part (router seeds) rotate
    over them, the expert block uses the first."""
    w = weight_sets[0]
    with applied(settings):
        plan = layer.plan_layer(spec, M, device)
        if part == "preamble":
            sets = [(x, ws) for (x, _), ws in zip(input_sets(spec, M, device, len(weight_sets)), weight_sets)]

            def call(x, weights):
                preamble.fused_preamble(spec, x, weights, block_m=plan.expert_config.block_m)
        elif part == "experts":
            sets, _ = routed_sets(spec, w, input_sets(spec, M, device, 8), plan.expert_config.block_m)

            def call(normed, ids, weights):
                dispatch.routed_experts(spec, normed, ids, weights, w)
        else:
            sets = layer_sets(spec, M, device, weight_sets)

            def call(x, normed, weights):
                layer.moe_layer(spec, x, weights, plan)
        return timing.graph_replay_us(call, sets)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="dsv3-ep8")
    ap.add_argument("--dtype", default="fp8", choices=list(DTYPES))
    ap.add_argument("--m", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part", choices=("layer", "preamble", "experts"), default="layer")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--router-seeds", type=int, default=0,
                    help="layer part: this many routers (router, norm and bias drawn per seed, experts shared), one "
                         "per input set, so the sets hit about as many local experts as routing should on average "
                         "(benchmarks/routing_seeds.py); 0: the one weight set")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    spec = SHAPES[args.shape].replace(quant=DTYPES[args.dtype])
    w = layer_weights(spec, device)
    weight_sets = [w]
    if args.part == "preamble":
        weight_sets = preamble_weight_copies(spec, w, torch.cuda.get_device_properties(device).L2_cache_size)
    elif args.part == "layer" and args.router_seeds:
        weight_sets = [with_new_router(spec, w, seed) for seed in range(1, args.router_seeds + 1)]
    ms = [int(m) for m in args.m.split(",")]
    if args.part == "layer":
        print("local experts hit per input set: " + "  ".join(
            f"M={M} {local_experts_hit(spec, layer_sets(spec, M, device, weight_sets))}" for M in ms), flush=True)
    variants = [(name, [resolve(t, v) for t, v in pairs]) for name, pairs in map(parse_variant, args.variant)]
    times: Dict[Tuple[str, int], List[float]] = {}
    for round_ in range(1, args.rounds + 1):
        for name, settings in variants:
            line = []
            for M in ms:
                us = time_variant(spec, weight_sets, M, device, settings, args.part)
                times.setdefault((name, M), []).append(us)
                line.append(f"M={M} {us:6.1f}")
            print(f"{name:>10} round {round_}: " + "  ".join(line), flush=True)
    print(f"median µs, {args.part}, {args.shape} {args.dtype}, {torch.cuda.get_device_name()}:")
    for name, _ in variants:
        print(f"{name:>10}: " + "  ".join(f"M={M} {statistics.median(times[name, M]):6.1f}" for M in ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
