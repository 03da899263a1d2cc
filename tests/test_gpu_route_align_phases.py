"""benchmarks/gpu_route_align_phases.py on the GPU (its cycle counter is PTX, which the interpreter
cannot run): the probe kernel routes and aligns as route_align_kernel does, in both pick modes, and
every phase reads a positive cycle count."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_route_align_phases  # noqa: E402
from moe_fusion.lowering import topk_kernel  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402


@pytest.mark.gpu
@pytest.mark.parametrize("sort_picks", [False, True])
@pytest.mark.parametrize("shape", ["dsv3", "qwen3-30b-a3b"])
def test_phase_probe_routes_and_aligns_as_the_kernel(shape, sort_picks, monkeypatch):
    monkeypatch.setattr(topk_kernel, "SORT_PICKS", sort_picks)
    spec = SHAPES[shape]
    logits = torch.randn((1, spec.num_experts), device="cuda") * 2
    bias = torch.randn(spec.num_experts, device="cuda") * 0.1
    row = gpu_route_align_phases.probe(spec, logits, bias, block_m=16, warps=4, repeats=3)
    assert row["same_as_kernel"]
    assert all(c > 0 for c in row["cycles"].values())
