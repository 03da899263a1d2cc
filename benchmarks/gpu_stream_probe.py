"""How fast can one wave of programs stream one fp8 expert's gate and up weights (dsv3: 2 x 2048 x 7168
bytes, 29 MB) from HBM, and what does GEMM1 lose against that? Issue 5's dsv3-ep8 fp8 M = 1 target
needs the expert block near 3 TB/s; GEMM1 streams one expert at ~2.2 TB/s (experts_notes.md,
sessions 9-11), and every tile the tuner tried lies on the same plateau. This separates the causes:

  stream  the weights read in GEMM1's pattern (its grid, tiles and pipelining), no arithmetic: each
          program XORs its tiles together (int32 view of the fp8 bytes) and stores one word;
  dot     the same loads feeding GEMM1's swapped fp8 dots against a 16-row token tile, without the
          per-step activation and weight scales;
  tma     dot's products with the tiles loaded by TMA (host tensor descriptors), then also with the loop
          warp-specialized (a producer warp issues the loads, the others multiply: Triton 3.6 on sm_90),
          each without and with GEMM1's per-group scales (-scaled): whether a TMA / warp-specialized
          GEMM1 would stream one expert faster than the cp.async pipeline does;
  gemm1   expert_gemm1_kernel itself at the shipped dsv3-shared fp8 M = 1 tiles (the scales, the
          alignment reads and the split sums' stores included), and gemm1+combine as the tuner times it;
          gemm2 likewise.

stream at a fraction of K (the same programs, fewer bytes each) also gives the wave's start cost:
time = start + bytes / rate. The same for GEMM2's weights (w_down, 15 MB) against GEMM2 itself. Every timing is a CUDA-graph replay rotating over copies of the weights
(tune_experts.weight_copies), so each replay reads from HBM.

--only layouts (LAYOUT_PROBES): each step's tile from one contiguous run of memory against the stored rows;
--only grids (GRID_PROBES): both matrices streamed by 64 to 1792 programs. Both ask whether a re-laid-out weight
copy or another tile count would stream a wave faster (session 24: no).

    python benchmarks/gpu_stream_probe.py [--json OUT.json] [--only layouts|grids]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from moe_fusion.lowering import expert_configs, experts, tune_experts  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402

TOKEN_TILE = 16  # GEMM1's block_m at M = 1


@triton.jit
def stream_kernel(g_ptr, u_ptr, out_ptr, k_per_split, n_blocks, stride_n, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PAIR: tl.constexpr, K_BLOCK_MAJOR: tl.constexpr):
    """Program (split, n block) reads rows [BLOCK_N] x K range [k_per_split] of g and (PAIR) u, in int32
    words, BLOCK_K words per step, as GEMM1's item does (GEMM2's without PAIR), and stores the XOR of
    all of it. The loop's
    num_stages makes Triton pipeline the loads through shared memory (cp.async, as GEMM1's dot
    operands are); without it loads that feed no dot are not pipelined. K_BLOCK_MAJOR: the matrix as if
    laid out [K / BLOCK_K, N, BLOCK_K], so that each step's tile is one contiguous run of memory instead of
    BLOCK_N rows' short pieces (the same bytes in all)."""
    pid = tl.program_id(0)
    split = pid // n_blocks
    rows = (pid - split * n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
    for k in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=STAGES):
        if K_BLOCK_MAJOR:
            offs = (k // BLOCK_K) * (n_blocks * BLOCK_N * BLOCK_K) + rows[:, None] * BLOCK_K + cols[None, :]
        else:
            offs = rows[:, None] * stride_n + (k + cols)[None, :]
        acc ^= tl.load(g_ptr + offs)
        if PAIR:
            acc ^= tl.load(u_ptr + offs)
    tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def dot_kernel(g_ptr, u_ptr, x_ptr, out_ptr, k_per_split, n_blocks, stride_n, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """stream_kernel's loads (fp8) feeding GEMM1's swapped dots (weights . tokens^T) against a
    BLOCK_M-row token tile x [BLOCK_M, K], without scales; stores the sum of both products."""
    pid = tl.program_id(0)
    split = pid // n_blocks
    rows = (pid - split * n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k in range(k_start, k_start + k_per_split, BLOCK_K):
        a = tl.load(x_ptr + tokens[:, None] * stride_n + (k + cols)[None, :])
        offs = rows[:, None] * stride_n + (k + cols)[None, :]
        acc_g += tl.dot(tl.load(g_ptr + offs), tl.trans(a))
        acc_u += tl.dot(tl.load(u_ptr + offs), tl.trans(a))
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc_g + acc_u, axis=1), axis=0))


@triton.jit
def tma_dot_kernel(g_desc, u_desc, x_desc, g_scale_ptr, u_scale_ptr, x_scale_ptr, out_ptr, k_per_split, n_blocks,
                   w_scale_stride, x_scale_stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   STAGES: tl.constexpr, SCALED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """dot_kernel with TMA loads (g_desc, u_desc: [BLOCK_N, BLOCK_K] boxes of one expert's weights,
    x_desc: [BLOCK_M, BLOCK_K] of the tokens); SCALED: each 128-wide K group's product times the
    weight block's scale and the tokens' scales, as GEMM1 does (BLOCK_K = 128, BLOCK_N <= 128)."""
    pid = tl.program_id(0)
    split = pid // n_blocks
    row0 = (pid - split * n_blocks) * BLOCK_N
    k_start = split * k_per_split
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=STAGES, warp_specialize=WARP_SPECIALIZE):
        g = g_desc.load([row0, k])
        u = u_desc.load([row0, k])
        x = x_desc.load([0, k])
        if SCALED:
            group = k // BLOCK_K
            x_scale = tl.load(x_scale_ptr + tl.arange(0, BLOCK_M) * x_scale_stride + group)
            g_scale = tl.load(g_scale_ptr + row0 // BLOCK_K * w_scale_stride + group)
            u_scale = tl.load(u_scale_ptr + row0 // BLOCK_K * w_scale_stride + group)
            acc_g += tl.dot(g, tl.trans(x)) * (g_scale * x_scale)[None, :]
            acc_u += tl.dot(u, tl.trans(x)) * (u_scale * x_scale)[None, :]
        else:
            acc_g = tl.dot(g, tl.trans(x), acc_g)
            acc_u = tl.dot(u, tl.trans(x), acc_u)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc_g + acc_u, axis=1), axis=0))


@dataclass
class Operands:
    """One expert's gate and up weights [N, K] fp8 with their [N/128, K/128] block scales, its down
    weights d [K, N], and a token tile x [BLOCK_M, K] fp8 with its [BLOCK_M, K/128] group scales."""

    g: torch.Tensor
    u: torch.Tensor
    g_scale: torch.Tensor
    u_scale: torch.Tensor
    x: torch.Tensor
    x_scale: torch.Tensor
    d: torch.Tensor


@dataclass(frozen=True)
class Probe:
    """One launch of stream_kernel, dot_kernel or tma_dot_kernel (kind): block_n rows x block_k bytes
    per step, split_k K ranges, k_fraction of K read (1 = the whole matrix); matrix "gate_up" (GEMM1's
    two weights) or "down" (GEMM2's, stream only)."""

    kind: str  # "stream" | "dot" | "tma" | "tma-ws" | "tma-scaled" | "tma-ws-scaled"
    block_n: int = 64
    block_k: int = 256
    split_k: int = 4
    num_stages: int = 3
    k_fraction: float = 1.0
    matrix: str = "gate_up"
    layout: str = "rows"  # "rows" (the weights as stored) | "k-blocks" (stream only: stream_kernel's K_BLOCK_MAJOR)

    def shape(self, o: Operands) -> tuple:
        """(rows, K bytes) of each matrix this probe reads."""
        return tuple((o.d if self.matrix == "down" else o.g).shape)

    def k_range(self, K: int) -> int:
        """Bytes of K each program reads: a whole number of steps."""
        per_split = int(K * self.k_fraction) // self.split_k
        return max(self.block_k, per_split // self.block_k * self.block_k)

    def programs(self, N: int) -> int:
        return N // self.block_n * self.split_k

    def bytes_read(self, N: int, K: int) -> int:
        return (1 if self.matrix == "down" else 2) * N * self.k_range(K) * self.split_k

    def launch(self, o: Operands, out: torch.Tensor) -> None:
        """Into out: one int32 (stream) or fp32 word per program."""
        N, K = self.shape(o)
        n_blocks, k_range = N // self.block_n, self.k_range(K)
        grid = (self.programs(N),)
        if self.kind == "stream":
            pair = self.matrix == "gate_up"
            words = [t.view(torch.int32) for t in ((o.g, o.u) if pair else (o.d, o.d))]
            stream_kernel[grid](*words, out, k_range // 4, n_blocks, K // 4, BLOCK_N=self.block_n,
                                BLOCK_K=self.block_k // 4, STAGES=self.num_stages, PAIR=pair,
                                K_BLOCK_MAJOR=self.layout == "k-blocks", num_warps=4)
        elif self.kind == "dot":
            dot_kernel[grid](o.g, o.u, o.x, out, k_range, n_blocks, K, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                             BLOCK_M=o.x.shape[0], num_warps=4, num_stages=self.num_stages)
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor

            boxes = [TensorDescriptor.from_tensor(t, [self.block_n, self.block_k]) for t in (o.g, o.u)]
            x_box = TensorDescriptor.from_tensor(o.x, [o.x.shape[0], self.block_k])
            tma_dot_kernel[grid](*boxes, x_box, o.g_scale, o.u_scale, o.x_scale, out, k_range, n_blocks,
                                 o.g_scale.stride(0), o.x_scale.stride(0), BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                                 BLOCK_M=o.x.shape[0], STAGES=self.num_stages, SCALED=self.kind.endswith("-scaled"),
                                 WARP_SPECIALIZE="-ws" in self.kind, num_warps=4)


PROBES: List[Probe] = [
    Probe("stream"),  # GEMM1's tiles at dsv3-ep8 fp8 M = 1: 128 programs, 7 steps of 2 x 16 KB
    Probe("dot"),
    *(Probe("stream", k_fraction=f) for f in (0.25, 0.5, 0.75)),
    Probe("stream", num_stages=2), Probe("stream", num_stages=4), Probe("stream", num_stages=6),
    Probe("stream", block_k=128, num_stages=6),
    Probe("stream", split_k=2), Probe("stream", split_k=8, block_k=128, num_stages=6),  # 64 and 256 programs
    Probe("stream", block_n=32, split_k=4),  # 256 programs of 32 rows
    Probe("stream", block_n=128, split_k=8, block_k=128, num_stages=6),
    Probe("dot", block_k=128, num_stages=4),  # the TMA probes' steps, loaded by cp.async
    *(Probe(kind, block_k=128, num_stages=4) for kind in ("tma", "tma-ws", "tma-scaled", "tma-ws-scaled")),
    Probe("tma-ws-scaled", block_k=128, num_stages=6),
    # GEMM2's weights with its tiles at dsv3-ep8 fp8 M = 1: 224 programs of 64 rows x 1 KB.
    *(Probe("stream", split_k=2, matrix="down", k_fraction=f) for f in (1.0, 0.5, 0.25)),
]
# Whether the weights' layout limits the stream: each step's tile contiguous against BLOCK_N pieces of
# BLOCK_K bytes, with GEMM1's and GEMM2's tiles (the dsv3-shared fp8 M = 1 entries and those above).
LAYOUT_PROBES: List[Probe] = [
    Probe("stream", layout=layout, **tiles)
    for tiles in (dict(), dict(block_k=128, num_stages=4), dict(split_k=2, matrix="down"),
                  dict(split_k=2, matrix="down", block_k=128, num_stages=4))
    for layout in ("rows", "k-blocks")
]


# How many programs one wave should have: GEMM1's and GEMM2's weights streamed by grids of 64 to 1792
# programs (one per item, all resident at once), against the shipped 128 and 224.
GRID_PROBES: List[Probe] = [
    *(Probe("stream", block_n=bn, split_k=s, block_k=bk, num_stages=st)
      for bn, s, bk, st in ((64, 4, 256, 3), (64, 8, 128, 4), (32, 4, 256, 3), (32, 8, 128, 4), (16, 8, 128, 4),
                            (16, 14, 128, 4), (128, 4, 128, 4))),
    *(Probe("stream", block_n=bn, split_k=s, block_k=bk, num_stages=st, matrix="down")
      for bn, s, bk, st in ((64, 2, 128, 4), (64, 1, 256, 4), (128, 2, 128, 4), (64, 4, 128, 4), (32, 2, 128, 4),
                            (32, 4, 128, 4), (64, 8, 128, 2), (16, 4, 128, 4))),
]


def _shipped_config(shape: tune_experts.Shape) -> expert_configs.ExpertConfig:
    name, sms = experts.device_facts(torch.device("cuda"))
    return expert_configs.lookup(tune_experts._key(shape, "fp8"), 1, name, sms)[0]


def run(n_copies: int = 4, probes: List[Probe] = PROBES, expert_gemms: bool = True) -> Dict:
    shape = tune_experts.SHAPES["dsv3-shared"]
    e = tune_experts.random_experts(shape, "fp8")
    copies = tune_experts.weight_copies(e, n_copies)
    N, K = e.w_gate.shape[1:]
    x = torch.randn(TOKEN_TILE, K, device="cuda").to(e.w_gate.dtype)
    x_scale = torch.rand(TOKEN_TILE, K // 128, device="cuda") + 0.5
    out = torch.empty(4 * N, dtype=torch.int32, device="cuda")
    operands = [(Operands(c.w_gate[0], c.w_up[0], c.w_gate_scale[0], c.w_up_scale[0], x, x_scale, c.w_down[0]),)
                for c in copies]
    copy_bw = timing.copy_bandwidth_bytes_per_s()
    rows = []
    for probe in probes:
        sink = out if probe.kind == "stream" else out.view(torch.float32)
        try:
            us = timing.graph_replay_us(lambda o: probe.launch(o, sink), operands)
        except Exception as exc:  # e.g. more shared memory than an SM has: reported, not fatal
            print(f"{probe}: skipped: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        n, k = probe.shape(operands[0][0])
        rows.append(dict(probe=vars(probe), programs=probe.programs(n), bytes=probe.bytes_read(n, k), us=round(us, 2)))
        print(f"{probe}: {us:.2f} us, {probe.bytes_read(n, k) / us / 1e6:.2f} TB/s", flush=True)
    if expert_gemms:
        rows += _time_expert_gemms(shape, e, copies)
    waves = {name: _start_and_rate(wave) for name, grid in WAVES.items()
             if len(wave := [r for r in rows if all(r["probe"].get(f) == v for f, v in grid.items())]) > 1}
    for name, (start, rate) in waves.items():
        print(f"stream, {name}: start {start:.2f} us, then {rate / 1e12:.2f} TB/s")
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_bytes_per_s=copy_bw, waves={k: dict(start_us=a, bytes_per_s=b) for k, (a, b) in waves.items()},
                rows=rows)


# The probes whose K fractions give a wave's start cost and rate: GEMM1's grid and GEMM2's.
WAVES = {
    "GEMM1's grid": dict(kind="stream", matrix="gate_up", block_n=64, block_k=256, split_k=4, num_stages=3,
                         layout="rows"),
    "GEMM2's grid": dict(kind="stream", matrix="down", block_n=64, block_k=256, split_k=2, num_stages=3,
                         layout="rows"),
}


def _time_expert_gemms(shape: tune_experts.Shape, e, copies) -> List[Dict]:
    """GEMM1 alone, GEMM1 with its combine (as the tuner times it) and GEMM2 alone, at the shipped
    dsv3-shared fp8 M = 1 tiles, each replay on another copy of the weights."""
    cfg = _shipped_config(shape)
    sets = tune_experts.input_sets(shape, e, 1, len(copies))
    launches = [tune_experts.make_launch(s, copies[i], cfg) for i, s in enumerate(sets)]
    for launch in launches:  # GEMM2 reads a real h
        launch.gemm1(cfg)
        launch.prepare_h()
    scale_bytes = e.w_gate_scale[0].numel() * 4
    gemms = (("gemm1", lambda l: l.gemm1(cfg), 2 * e.w_gate[0].numel() + 2 * scale_bytes),
             ("gemm1+combine", lambda l: (l.gemm1(cfg), l.prepare_h()), 2 * e.w_gate[0].numel() + 2 * scale_bytes),
             ("gemm2", lambda l: l.gemm2(cfg), e.w_down[0].numel() + e.w_down_scale[0].numel() * 4))
    rows = []
    for name, fn, nbytes in gemms:
        us = timing.graph_replay_us(fn, [(l,) for l in launches])
        rows.append(dict(probe=dict(kind=name, config=cfg.to_dict()), bytes=nbytes, us=round(us, 2)))
        print(f"{name} {cfg}: {us:.2f} us, {nbytes / us / 1e6:.2f} TB/s", flush=True)
    return rows


def _start_and_rate(rows: List[Dict]) -> tuple:
    """Least-squares time = start + bytes / rate over the K fractions of one probe."""
    b = torch.tensor([float(r["bytes"]) for r in rows], dtype=torch.float64)
    t = torch.tensor([r["us"] for r in rows], dtype=torch.float64)
    slope, start = torch.linalg.lstsq(torch.stack([b, torch.ones_like(b)], 1), t.unsqueeze(1)).solution.flatten().tolist()
    return start, 1e6 / slope


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--copies", type=int, default=4, help="weight copies rotated over (each 44 MB)")
    ap.add_argument("--only", choices=("layouts", "grids"), help="only LAYOUT_PROBES or GRID_PROBES")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_stream_probe: needs a CUDA device")
        return 0
    subsets = dict(layouts=LAYOUT_PROBES, grids=GRID_PROBES)
    result = run(args.copies, subsets[args.only], expert_gemms=False) if args.only else run(args.copies)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
