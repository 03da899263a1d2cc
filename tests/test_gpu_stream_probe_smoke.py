"""benchmarks/gpu_stream_probe.py's probe kernels on small shapes (interpreter on the CPU, compiled where
there is a GPU): each program's word is what its tiles give in torch, so the timings on the GPU time
kernels that read every byte they claim to."""
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_stream_probe  # noqa: E402
from gpu_stream_probe import Operands, Probe  # noqa: E402
from moe_cases import DEVICE, needs_kernels  # noqa: E402
from moe_fusion.spec import FP8_DTYPE  # noqa: E402

pytestmark = needs_kernels
N, K, TOKENS = 128, 1024, 16  # K bytes in 2 splits of 512: 2 steps of 256, or 4 of 128


def _operands(seed) -> Operands:
    g = torch.Generator().manual_seed(seed)

    def fp8(*shape):
        return (torch.randn(*shape, generator=g) * 4).to(FP8_DTYPE).to(DEVICE)

    def scales(rows):
        return (torch.rand(rows, K // 128, generator=g) + 0.5).to(DEVICE)

    return Operands(fp8(N, K), fp8(N, K), scales(N // 128), scales(N // 128), fp8(TOKENS, K), scales(TOKENS),
                    fp8(K, N))


def _blocks(probe, t):
    """Each program's [block_n, k_range] slice of t, in program order, with its first column and row."""
    rows, cols = t.shape
    n_blocks, k_range = rows // probe.block_n, probe.k_range(cols)
    return [(t[(p % n_blocks) * probe.block_n:][:probe.block_n, (p // n_blocks) * k_range:][:, :k_range],
             (p // n_blocks) * k_range, (p % n_blocks) * probe.block_n) for p in range(probe.programs(rows))]


def _xor(words):
    """The XOR of int32 words, as an int32."""
    acc = 0
    for w in words.cpu().tolist():
        acc ^= w
    return acc if acc < 2**31 else acc - 2**32


@pytest.mark.parametrize("k_fraction", [1.0, 0.5])
def test_stream_probe_xors_every_word_it_reads(k_fraction):
    probe = Probe("stream", block_n=32, block_k=256, split_k=2, k_fraction=k_fraction)
    o = _operands(0)
    out = torch.zeros(probe.programs(N), dtype=torch.int32, device=DEVICE)
    probe.launch(o, out)
    words = [torch.cat([a.contiguous().view(torch.int32).flatten(), b.contiguous().view(torch.int32).flatten()])
             for (a, _, _), (b, _, _) in zip(_blocks(probe, o.g), _blocks(probe, o.u))]
    assert out.cpu().tolist() == [_xor(w) for w in words]
    assert probe.bytes_read(N, K) == 2 * N * int(K * k_fraction)


def test_stream_probe_in_k_blocks_reads_each_programs_contiguous_tiles():
    """The k-blocks layout: the matrix's words as [K / block_k, N, block_k], a program reading its row block
    of its split's steps: contiguous tiles, the whole matrix once over all programs."""
    probe = Probe("stream", block_n=32, block_k=256, split_k=2, layout="k-blocks")
    o = _operands(1)
    out = torch.zeros(probe.programs(N), dtype=torch.int32, device=DEVICE)
    probe.launch(o, out)
    step_words, n_blocks = probe.block_k // 4, N // probe.block_n
    steps_per_split = probe.k_range(K) // probe.block_k

    def tiles(t, p):
        blocks = t.contiguous().view(torch.int32).flatten().view(-1, N, step_words)
        split, block = divmod(p, n_blocks)
        return blocks[split * steps_per_split:][:steps_per_split, block * probe.block_n:][:, :probe.block_n].flatten()

    assert out.cpu().tolist() == [_xor(torch.cat([tiles(o.g, p), tiles(o.u, p)])) for p in range(probe.programs(N))]
    every = torch.cat([o.g.contiguous().view(torch.int32).flatten(), o.u.contiguous().view(torch.int32).flatten()])
    assert _xor(out) == _xor(every)


def test_stream_probe_of_the_down_weights_reads_them_once():
    probe = Probe("stream", block_n=64, block_k=64, split_k=2, matrix="down")
    o = _operands(2)
    assert probe.shape(o) == (K, N)
    out = torch.zeros(probe.programs(K), dtype=torch.int32, device=DEVICE)
    probe.launch(o, out)
    assert out.cpu().tolist() == [_xor(d.contiguous().view(torch.int32).flatten()) for d, _, _ in _blocks(probe, o.d)]
    assert probe.bytes_read(K, N) == K * N


# Hopper's fp8 MMA adds into its accumulator with fewer mantissa bits than fp32 (the DeepSeek-V3
# report, section 3.3.2). On the H100 (session 13) these sums were off by up to 9.6 where the sum of
# the products' magnitudes is ~1.2e6 (2^-17 of it); the band is 2^-14 of it. A tile read twice or
# not at all moves a sum by thousands.
FP8_MMA_ERROR = 2.0**-14 if torch.cuda.is_available() else 0.0


def _products(probe, o, scaled):
    """Per program: the sum of its gate and up products with the tokens (per 128-wide group times
    the weight block's and the tokens' scales where scaled), and the band the MMA's accumulation
    may move it by (FP8_MMA_ERROR of the products' magnitudes)."""
    want, band = [], []
    for (a, k0, r0), (b, _, _) in zip(_blocks(probe, o.g), _blocks(probe, o.u)):
        total, magnitude = 0.0, 0.0
        for j in range(0, a.shape[1], 128):
            group = (k0 + j) // 128
            x = o.x.float()[:, k0 + j:k0 + j + 128]
            for w, s in ((a, o.g_scale), (b, o.u_scale)):
                product = w.float()[:, j:j + 128] @ x.T
                if scaled:
                    product = product * s[r0 // 128, group] * o.x_scale[:, group][None, :]
                total += float(product.sum())
                magnitude += float(product.abs().sum())
        want.append(total)
        band.append(magnitude * FP8_MMA_ERROR)
    return torch.tensor(want), torch.tensor(band)


@pytest.mark.parametrize("kind", ["dot", "tma", "tma-ws", "tma-scaled", "tma-ws-scaled"])
def test_dot_probes_sum_both_products(kind):
    probe = Probe(kind, block_n=64, block_k=128, split_k=2, num_stages=2)
    o = _operands(1)
    out = torch.zeros(probe.programs(N), dtype=torch.float32, device=DEVICE)
    probe.launch(o, out)
    want, band = _products(probe, o, kind.endswith("-scaled"))
    assert ((out.cpu() - want).abs() <= band + 1e-4 * want.abs() + 1e-1).all(), (out.cpu(), want, band)


def test_every_probe_reads_whole_steps_of_the_expert():
    for probe in gpu_stream_probe.PROBES:
        rows, k = (7168, 2048) if probe.matrix == "down" else (2048, 7168)
        assert probe.k_range(k) % probe.block_k == 0 and rows % probe.block_n == 0
    for grid in gpu_stream_probe.WAVES.values():  # each wave's fit has several K fractions to fit
        assert sum(all(vars(p)[f] == v for f, v in grid.items()) for p in gpu_stream_probe.PROBES) >= 3
