"""Regenerate the expert kernels' tile table by timing candidates on this GPU:

    python -m moe_fusion.lowering.tune_experts [--shapes dsv3,dsv3-ep8,qwen3-30b-a3b,mixtral,dsv3-shared]
        [--dtypes bfloat16,fp8] [--m 1,2,4,8,16,32,64] [--out moe_fusion/lowering/expert_configs.json]

For each (shape, dtype, M bucket) GEMM1 and GEMM2 are timed separately (CUDA-graph replays over
rotated random routings, never zeros) for each token tile block_m; the fastest pair is written
under this device's name, merged into the existing table. Weights are random, all experts of
a shape are allocated once per shape (dsv3 bf16: 22.5 GB); a shape whose experts would stay in L2
between replays (dsv3-shared) gets a copy per input set (weight_copies).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..spec import MoESpec
from . import expert_configs, experts, reference
from .expert_configs import ExpertConfig, GemmTiles, ProblemKey


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int  # global (router) experts
    local_experts: int
    top_k: int
    n_group: int = 1  # DeepSeek's grouped top-k: topk_group of n_group expert groups, then top_k among them
    topk_group: int = 1
    bias_std: float = 0.0  # DeepSeek's correction bias, as the bench draws it (one per routing's tokens)

    def routing_spec(self) -> MoESpec:
        """What reference.select_experts needs to pick this shape's experts from sigmoid scores."""
        return MoESpec(hidden_size=self.hidden, num_experts=self.experts, top_k=self.top_k,
                       intermediate_size=self.inter, scoring="sigmoid", correction_bias=self.bias_std > 0,
                       n_group=self.n_group, topk_group=self.topk_group)


SHAPES: Dict[str, Shape] = {
    "dsv3": Shape(7168, 2048, 256, 256, 8, n_group=8, topk_group=4, bias_std=0.1),
    "dsv3-ep8": Shape(7168, 2048, 256, 32, 8, n_group=8, topk_group=4, bias_std=0.1),
    "qwen3-30b-a3b": Shape(2048, 768, 128, 128, 8),
    "mixtral": Shape(4096, 14336, 8, 8, 2),
    # DeepSeek-V3's shared expert as a launch of its own (experts.shared_expert_config): one expert
    # every token selects.
    "dsv3-shared": Shape(7168, 2048, 1, 1, 1),
}
M_VALUES = (1, 2, 4, 8, 16, 32, 64)


# --------------------------------------------------------------------------- random problems
def random_experts(shape: Shape, dtype: str, device="cuda", seed: int = 0,
                   model_dtype=torch.bfloat16) -> experts.ExpertTensors:
    """Random experts (std 1/sqrt(fan-in)); fp8 ones block-quantised from bf16 by the kernel.
    EP: this rank owns the contiguous block of global experts [0, local_experts)."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = shape.local_experts, shape.hidden, shape.inter

    def mat(*dims):
        t = torch.empty(dims, dtype=model_dtype, device=device)
        for e in range(dims[0]):  # per expert: no full-size fp32 temporary
            t[e] = torch.randn(dims[1:], generator=g, device=device, dtype=torch.float32) / dims[-1] ** 0.5
        return t

    e = experts.ExpertTensors(mat(E, I, H), mat(E, I, H), mat(E, H, I), num_global_experts=shape.experts)
    if shape.local_experts != shape.experts:
        emap = torch.full((shape.experts,), -1, dtype=torch.int32, device=device)
        emap[:E] = torch.arange(E, dtype=torch.int32, device=device)
        e.expert_map = emap
    if dtype == "fp8":
        q = experts.quantize_expert_tensors_fp8(e)
        del e
        return q
    return e


def random_routing(shape: Shape, m: int, device="cuda", generator=None):
    """Distinct experts per token, picked from random sigmoid scores by reference.select_experts: DeepSeek shapes
    first keep topk_group of n_group groups by their two best scores, and a correction bias shared by the
    routing's tokens skews them alike (as one router's bias and weights do). So an expert-parallel rank's hits
    spread as the bench's do (routing_seeds.local_hit_distribution): at dsv3-ep8 M = 1 half the routings hit
    none of its 32 experts and a quarter two, where uniform picks give 34% and 20% (session 20). Positive
    weights summing to 1 per token."""
    logits = torch.randn(m, shape.experts, device=device, generator=generator)
    bias = shape.bias_std * torch.randn(shape.experts, device=device, generator=generator) if shape.bias_std else None
    ids, _ = reference.select_experts(shape.routing_spec(), logits, bias)
    w = torch.rand(m, shape.top_k, device=device, generator=generator) + 0.1
    return ids, w / w.sum(-1, keepdim=True)


def touched_experts(ids: torch.Tensor, e: experts.ExpertTensors) -> int:
    local = ids.long().flatten()
    if e.expert_map is not None:
        local = e.expert_map.long()[local]
    return int(local[local >= 0].unique().numel())


def expert_bytes(e: experts.ExpertTensors) -> int:
    """Bytes of one expert's weights, scales included."""
    total = 0
    for t in (e.w_gate, e.w_up, e.w_down, e.w_gate_scale, e.w_up_scale, e.w_down_scale):
        if t is not None:
            total += t[0].numel() * t.element_size()
    return total


# The replays of a timing rotate over the input sets. Where all of a shape's experts fit in L2 a few
# times over (dsv3-shared: one expert, 44 MB in fp8, 88 MB in bf16, against the H100's 50 MB L2), a
# replay would find what the one before it read still in L2: such shapes get a copy of their weights
# per input set, up to this many bytes in all, so that each replay reads its weights from HBM as a
# layer does (session 9 found dsv3-shared's tiles tuned partly from L2).
ROTATED_WEIGHT_BYTES = 256 << 20


def weight_copies(e: experts.ExpertTensors, n_sets: int) -> List[experts.ExpertTensors]:
    """``e`` and as many copies of its weights as keep n_sets rotated replays reading distinct bytes,
    within ROTATED_WEIGHT_BYTES."""
    total = expert_bytes(e) * e.num_local
    n = min(n_sets, max(1, -(-ROTATED_WEIGHT_BYTES // total)))
    weights = ("w_gate", "w_up", "w_down", "w_gate_scale", "w_up_scale", "w_down_scale")
    return [e] + [dataclasses.replace(e, **{f: getattr(e, f).clone() for f in weights if getattr(e, f) is not None})
                  for _ in range(n - 1)]


@dataclass
class InputSet:
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    touched: int


def input_sets(shape: Shape, e: experts.ExpertTensors, m: int, n_sets: int, seed: int = 1,
               dtype=torch.bfloat16) -> List[InputSet]:
    device = e.w_gate.device
    g = torch.Generator(device=device).manual_seed(seed + m)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(m, shape.hidden, device=device, generator=g).to(dtype)
        ids, w = random_routing(shape, m, device=device, generator=g)
        sets.append(InputSet(x, ids, w, touched_experts(ids, e)))
    return sets


def make_launch(s: InputSet, e: experts.ExpertTensors, config: ExpertConfig, deterministic=False):
    """An ExpertLaunch with its alignment, buffers and (fp8) quantised input ready."""
    _, sms = experts.device_facts(s.x.device)
    alignment = reference.align_pairs(s.ids, e.expert_map, e.num_local, config.block_m)
    launch = experts.ExpertLaunch(
        x=s.x, pair_weights=s.weights.reshape(-1).float(), topk_ids=s.ids, experts=e, alignment=alignment,
        weight_on_input=False, num_sms=sms, pdl=experts.pdl_mode(s.x.device, s.x.shape[0]),
    )
    launch.allocate(config, deterministic, torch.float32)
    launch.quantize_input()
    return launch


# --------------------------------------------------------------------------- candidates
def candidate_block_m(shape: Shape, m: int) -> List[int]:
    key = _key(shape, "bfloat16")
    pairs_per_expert = m * shape.top_k * (shape.local_experts / shape.experts) / max(
        1.0, expert_configs.expected_active_experts(key, m))
    if pairs_per_expert <= 8:
        return [16]
    return [16, 32] if pairs_per_expert <= 24 else [16, 32, 64]


def gemm1_candidates(shape: Shape, fp8: bool, m: int, sms: int) -> List[GemmTiles]:
    active = max(1.0, expert_configs.expected_active_experts(_key(shape, "bfloat16"), m))
    ns = [bn for bn in (16, 32, 64, 128) if active * shape.inter / bn >= 0.5 * sms] or [16]
    # fp8 K steps of 2 or 4 scale groups: measured 3-8% faster at dsv3-ep8 M >= 2 (notes, session 4).
    ks = [(128, 4), (128, 6), (256, 3), (256, 4), (512, 2), (512, 3)] if fp8 else [(128, 4), (256, 3), (512, 2)]
    plain = [GemmTiles(bn, bk, 4, st, pp) for bn in ns[-3:] for bk, st in ks for pp in (1, 2)]
    # Swapped operands need 64 weight rows per program for the wide MMA, however few that leaves.
    swapped = [GemmTiles(bn, bk, 4, st, pp, swap_ab=True) for bn in (64, 128) for bk, st in ks for pp in (1, 2)]
    # ... and split K where those tiles are too few for the SMs (one active expert: 32 of 64 rows), up to
    # two waves of 2 programs per SM: under expert parallelism a call's hits spread far around their mean
    # (dsv3-ep8 M = 4: 0 to 8). The bound was one wave until session 20, which left out dsv3-ep8 M = 4's
    # 4-way split (256 items per expert). Timed alone with grouped routing the tuner prefers it (session 21:
    # 35.8 against 36.2 µs). In the layer, by hit count, it was 0.8 / 0.9 µs faster (session 24, two seeds: a single
    # hit's 64 items of the 2-way split left half the SMs idle), and the table takes it.
    split = [GemmTiles(bn, bk, 4, st, pp, s, swap_ab=True) for bn in (64, 128) for s in (2, 4)
             if active * shape.inter / bn * s <= 4 * sms for bk, st in ks for pp in (1, 2)]
    return plain + swapped + split


def gemm2_candidates(shape: Shape, fp8: bool, m: int, sms: int) -> List[GemmTiles]:
    active = max(1.0, expert_configs.expected_active_experts(_key(shape, "bfloat16"), m))
    out = []
    for bn in (32, 64, 128):
        for split in (1, 2, 4, 8):
            if split > 1 and active * shape.hidden / bn * split / 2 >= 2 * sms:
                break  # the previous split already gave every SM a couple of tiles
            if shape.inter // split < 256:
                break
            for bk, st in ((128, 4), (256, 3), (512, 2)):
                out.append(GemmTiles(bn, bk, 4, st, 2, split))
                if bn >= 64:
                    out.append(GemmTiles(bn, bk, 4, st, 2, split, swap_ab=True))
    return out


def _key(shape: Shape, dtype: str) -> ProblemKey:
    return ProblemKey(dtype, shape.hidden, shape.inter, shape.local_experts, shape.experts, shape.top_k)


# --------------------------------------------------------------------------- timing
def time_us(fn, launches: Sequence, replays: int = 5, batches: int = 3) -> float:
    from ..tools.timing import graph_replay_us

    inputs = [(l,) for l in launches]
    first = graph_replay_us(fn, inputs, replays=1, batches=1)
    if first * len(inputs) > 2000:  # slow points (large M): fewer replays, same rotation
        replays = 2
    return graph_replay_us(fn, inputs, replays=replays, batches=batches)


def tune_point(shape: Shape, copies: List[experts.ExpertTensors], dtype: str, m: int, sets: List[InputSet],
               log=print) -> ExpertConfig:
    """The fastest tiles for m tokens; input set i runs on copies[i % len(copies)] (weight_copies)."""
    _, sms = experts.device_facts(torch.device("cuda"))
    best = None
    for block_m in candidate_block_m(shape, m):
        g1_best = g2_best = None
        base = ExpertConfig(block_m, GemmTiles(16, 128), GemmTiles(32, 128))
        launches = [make_launch(s, copies[i % len(copies)], base) for i, s in enumerate(sets)]
        for launch in launches:  # GEMM2 is timed on real h, not on an uninitialised buffer
            launch.gemm1(base)
            launch.prepare_h()
        for g1 in gemm1_candidates(shape, dtype == "fp8", m, sms):
            cfg = ExpertConfig(block_m, g1, base.gemm2)
            for l in launches:
                l.use_gemm1_splits(g1.split_k)
            # GEMM1 with what makes its h ready for GEMM2 (fp8 quantisation, the splits' sum).
            t = _try(lambda l: (l.gemm1(cfg), l.prepare_h()), launches)
            log(f"    gemm1 {g1}: {t} us")
            if t is not None and (g1_best is None or t < g1_best[0]):
                g1_best = (t, g1)
        for g2 in gemm2_candidates(shape, dtype == "fp8", m, sms):
            cfg = ExpertConfig(block_m, base.gemm1, g2)
            for l in launches:
                l.split_k = g2.split_k  # atomic mode: the accumulator does not depend on split_k
            t = _try(lambda l: l.gemm2(cfg), launches)
            log(f"    gemm2 {g2}: {t} us")
            if t is not None and (g2_best is None or t < g2_best[0]):
                g2_best = (t, g2)
        total = g1_best[0] + g2_best[0]
        log(f"  block_m {block_m}: gemm1 {g1_best[0]:.1f} us {g1_best[1]}, gemm2 {g2_best[0]:.1f} us {g2_best[1]}")
        if best is None or total < best[0]:
            best = (total, ExpertConfig(block_m, g1_best[1], g2_best[1]))
    return best[1]


def _try(fn, launches) -> Optional[float]:
    try:
        return time_us(fn, launches)
    except Exception as exc:  # a candidate that does not compile (shared memory) is skipped
        print(f"    skipped: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dtypes", default="bfloat16,fp8")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)))
    p.add_argument("--out", default=expert_configs.TABLE_PATH)
    p.add_argument("--sets", type=int, default=4, help="rotated routings per timing")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting new points after this many seconds")
    args = p.parse_args(argv)
    device_name, _ = experts.device_facts(torch.device("cuda"))
    table = json.load(open(args.out)) if os.path.exists(args.out) else {}
    start = time.time()
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        for dtype in args.dtypes.split(","):
            e = random_experts(shape, dtype)
            copies = weight_copies(e, args.sets)
            for m in map(int, args.m.split(",")):
                if args.budget_s and time.time() - start > args.budget_s:
                    print(f"budget spent: stopping before {shape_name} {dtype} M={m}")
                    break
                t0 = time.time()
                sets = input_sets(shape, e, m, args.sets)
                print(f"{shape_name} {dtype} M={m}:", flush=True)
                cfg = tune_point(shape, copies, dtype, m, sets)
                entry = table.setdefault(device_name, {}).setdefault(_key(shape, dtype).name(), {})
                entry[str(expert_configs.m_bucket(m))] = cfg.to_dict()
                print(f"  -> {cfg}  ({time.time() - t0:.0f} s)", flush=True)
                with open(args.out, "w") as f:
                    json.dump(table, f, indent=1, sort_keys=True)
            del e, copies
            torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
