"""Where route_align_kernel's time goes at decode batch 1 (issue 4: the dsv3 preamble ends 4.4 us after
the router GEMM, H100 session 13's timeline, most of it this one program). The probe kernel is
route_align_kernel's one-tile path built from the same helpers, with the SM's cycle counter read
between its phases, each read made to wait for the value the phase produced:

  bias     the correction bias loaded (before the wait for the logits in the real kernel);
  route    topk_kernel.route_rows: logits loaded, scored, groups kept, 8 picks, weights stored;
  select   the [tokens, local experts] selection from the ids in registers;
  align    align_kernel.align_selection: counts, tiles, padding and pairs stored (stores issued).

It runs alone on logits already in memory (no PDL), at several warp counts (the kernel ships with 4;
16 took 29.6 us in the preamble against 8.7), with the picks one by one or by one sort
(topk_kernel.SORT_PICKS: programs of more than one warp), and checks that its outputs equal
route_and_align's.

    python benchmarks/gpu_route_align_phases.py [--shape dsv3] [--warps 1,2,4,8,16] [--sort-picks 0,1]
        [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from moe_fusion.lowering import align_kernel, route_align_kernel, topk_kernel  # noqa: E402
from moe_fusion.lowering.align_kernel import align_selection, selection_of_local_ids  # noqa: E402
from moe_fusion.lowering.topk_kernel import load_route_bias, route_rows  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402

PHASES = ("bias", "route", "select", "align")


@triton.jit
def _cycles_after(value):
    """The SM's cycle counter, read once ``value`` (an int32 scalar) exists."""
    return tl.inline_asm_elementwise("{ .reg .b32 dep; mov.b32 dep, $1; mov.u64 $0, %clock64; }", "=l,r",
                                     [value], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _route_align_phases_kernel(
    logits_ptr, stride_lm, bias_ptr, ids_ptr, weights_ptr, stride_om, M, renorm_eps, routed_scale,
    sorted_ptr, tile_expert_ptr, num_tiles_ptr, L, block_m, max_tiles, cycles_ptr,
    ROWS: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr, EPG: tl.constexpr,
    EPG_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr, SCORE_BEFORE_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_MAX: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_TO: tl.constexpr, SORT_PICKS: tl.constexpr,
    L_PAD: tl.constexpr,
):
    start = _cycles_after(M)
    bias = load_route_bias(bias_ptr, HAS_BIAS, N_GROUP, G_PAD, EPG, EPG_PAD)
    after_bias = _cycles_after((tl.sum(bias) != 0).to(tl.int32))
    ids = route_rows(logits_ptr, stride_lm, bias, ids_ptr, weights_ptr, stride_om, 0, M, renorm_eps, routed_scale,
                     ROWS, N_GROUP, G_PAD, EPG, EPG_PAD, TOP_K, K_PAD, TOPK_GROUP, SCORING, SCORE_BEFORE_TOPK,
                     HAS_BIAS, GROUP_MAX, RENORMALIZE, ROUND_TO, SORT_PICKS, False)
    after_route = _cycles_after(tl.sum(ids))
    real = (tl.arange(0, ROWS) < M)[:, None] & (tl.arange(0, K_PAD) < TOP_K)[None, :]
    slot = selection_of_local_ids(tl.where(real, ids, -1), K_PAD, L_PAD)
    after_select = _cycles_after(tl.sum(slot))
    align_selection(slot, M, L, block_m, max_tiles, sorted_ptr, tile_expert_ptr, num_tiles_ptr, ROWS, L_PAD, TOP_K)
    after_align = _cycles_after(L)
    tl.store(cycles_ptr + 0, after_bias - start)
    tl.store(cycles_ptr + 1, after_route - after_bias)
    tl.store(cycles_ptr + 2, after_select - after_route)
    tl.store(cycles_ptr + 3, after_align - after_select)


def probe(spec, logits, bias, block_m: int, warps: int, repeats: int) -> dict:
    """Median cycles per phase over ``repeats`` launches, and whether the outputs were route_and_align's."""
    M, device = logits.shape[0], logits.device
    route = topk_kernel.route_meta(spec, torch.float32, M, topk_kernel.ROWS_TILE)
    align = align_kernel.align_meta_after_routing(spec.num_local_experts, spec.top_k, None, M)
    ids = torch.empty((M, spec.top_k), dtype=torch.int32, device=device)
    weights = torch.empty((M, spec.top_k), dtype=torch.float32, device=device)
    outputs = align_kernel.alloc_align_outputs(M, spec.top_k, spec.num_local_experts, block_m, device)
    cycles = torch.zeros(len(PHASES), dtype=torch.int64, device=device)
    sort_picks = topk_kernel.picks_by_sort(warps)
    samples = []
    for _ in range(repeats):
        _route_align_phases_kernel[(1,)](
            logits, logits.stride(0), bias, ids, weights, ids.stride(0), M, spec.renormalize_eps,
            spec.routed_scaling_factor, *outputs, spec.num_local_experts, block_m, outputs[1].numel(), cycles,
            **route, SORT_PICKS=sort_picks, L_PAD=align["L_PAD"], num_warps=warps)
        samples.append(cycles.tolist())
    want_ids = torch.empty_like(ids)
    want = route_align_kernel.route_and_align(spec, logits, bias, torch.float32, want_ids, torch.empty_like(weights),
                                              None, block_m)
    same = torch.equal(ids, want_ids) and all(torch.equal(a, b) for a, b in zip(outputs, want))
    return dict(warps=warps, sort_picks=sort_picks, same_as_kernel=same,
                cycles={p: statistics.median(s[i] for s in samples) for i, p in enumerate(PHASES)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="dsv3")
    ap.add_argument("--warps", default="1,2,4,8,16")
    ap.add_argument("--sort-picks", default="0", help="topk_kernel.SORT_PICKS values to run, e.g. 0,1")
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    spec = SHAPES[args.shape]
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn((1, spec.num_experts), generator=g, device=device) * 2
    bias = torch.randn(spec.num_experts, generator=g, device=device) * 0.1
    mhz = torch.cuda.clock_rate(device)
    rows = []
    for sort_picks in args.sort_picks.split(","):
        topk_kernel.SORT_PICKS = bool(int(sort_picks))
        rows += [probe(spec, logits, bias, args.block_m, int(w), args.repeats) for w in args.warps.split(",")]
    print(f"{torch.cuda.get_device_name(device)}, SM clock {mhz} MHz (cycles / that = us), {args.shape} M = 1")
    for r in rows:
        us = {p: c / mhz for p, c in r["cycles"].items()}
        phases = "  ".join(f"{p} {c:6.0f} cyc {us[p]:5.2f} us" for p, c in r["cycles"].items())
        print(f"sort picks {int(r['sort_picks'])} warps {r['warps']:2d}: {phases}  total {sum(us.values()):5.2f} us; "
              f"outputs equal route_and_align's: {r['same_as_kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), sm_mhz=mhz, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
