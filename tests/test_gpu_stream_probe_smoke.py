"""benchmarks/gpu_stream_probe.py's two probe kernels on small shapes (interpreter on the CPU, compiled
where there is a GPU): each program's word is what its tiles give in torch, so the timings on the GPU
time kernels that read every byte they claim to."""
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_stream_probe  # noqa: E402
from moe_fusion.spec import FP8_DTYPE  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 64, 1024  # 4 row blocks of 16, K bytes in 2 splits of 512 (2 steps of 256)


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, K, generator=g) * 4).to(FP8_DTYPE).to(DEVICE) for _ in range(2)]


def _program_blocks(probe, t):
    """[programs] list of each program's [block_n, k_range] slice of t, in program order."""
    n_blocks, k_range = N // probe.block_n, probe.k_range(K)
    return [t[(p % n_blocks) * probe.block_n:][:probe.block_n, (p // n_blocks) * k_range:][:, :k_range]
            for p in range(probe.programs(N))]


@pytest.mark.parametrize("k_fraction", [1.0, 0.5])
def test_stream_probe_xors_every_word_it_reads(k_fraction):
    probe = gpu_stream_probe.Probe("stream", block_n=16, block_k=256, split_k=2, k_fraction=k_fraction)
    g, u = _weights(0)
    out = torch.zeros(probe.programs(N), dtype=torch.int32, device=DEVICE)
    probe.launch(g, u, None, out)
    words = [torch.cat([a.contiguous().view(torch.int32).flatten(), b.contiguous().view(torch.int32).flatten()])
             for a, b in zip(_program_blocks(probe, g), _program_blocks(probe, u))]
    assert out.cpu().tolist() == [_xor(w) for w in words]
    assert probe.bytes_read(N, K) == 2 * N * int(K * k_fraction)


def _xor(words):
    """The XOR of int32 words, as an int32."""
    acc = 0
    for w in words.cpu().tolist():
        acc ^= w
    return acc if acc < 2**31 else acc - 2**32


def test_dot_probe_sums_both_products():
    probe = gpu_stream_probe.Probe("dot", block_n=16, block_k=256, split_k=2)
    g, u = _weights(1)
    x = (torch.randn(16, K, generator=torch.Generator().manual_seed(2)) * 4).to(FP8_DTYPE).to(DEVICE)
    out = torch.zeros(probe.programs(N), dtype=torch.float32, device=DEVICE)
    probe.launch(g, u, x, out)
    k_range = probe.k_range(K)
    want = [float((a.float() @ x.float()[:, (p // (N // 16)) * k_range:][:, :k_range].T).sum()
                  + (b.float() @ x.float()[:, (p // (N // 16)) * k_range:][:, :k_range].T).sum())
            for p, (a, b) in enumerate(zip(_program_blocks(probe, g), _program_blocks(probe, u)))]
    torch.testing.assert_close(out.cpu(), torch.tensor(want), rtol=1e-4, atol=1e-2)
