"""benchmarks/gpu_layer_ab.py's variant settings, which need no GPU: parsed, resolved against the
lowering modules (an unknown attribute is an error, not a silent no-op) and undone after each variant."""
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_layer_ab  # noqa: E402
from layer_cases import layer_weights  # noqa: E402
from moe_fusion.lowering import experts, layer  # noqa: E402
from moe_fusion.tools import bench, bench_layers  # noqa: E402


def test_variant_settings_are_applied_then_undone():
    name, pairs = gpu_layer_ab.parse_variant("hg:experts.EXPERT_PDL=h+gemm2,layer.options.shared_fp8=True")
    assert name == "hg" and pairs == [("experts.EXPERT_PDL", "h+gemm2"), ("layer.options.shared_fp8", "True")]
    settings = [gpu_layer_ab.resolve(t, v) for t, v in pairs]
    before = (experts.EXPERT_PDL, layer.options.shared_fp8)
    undo = gpu_layer_ab.apply(settings)
    try:
        assert experts.EXPERT_PDL == "h+gemm2" and layer.options.shared_fp8 is True
    finally:
        gpu_layer_ab.apply(undo)
    assert (experts.EXPERT_PDL, layer.options.shared_fp8) == before


def test_an_unknown_setting_is_refused():
    with pytest.raises(AttributeError):
        gpu_layer_ab.resolve("experts.NO_SUCH_SETTING", "1")


def test_preamble_weights_rotate_beyond_l2():
    """The preamble A/B's weight copies: as many as the bench's preamble part uses, each its own
    router, norm and bias tensors (so a replay reads them from HBM), the expert weights shared."""
    spec = bench_layers.SHAPES["tiny"]
    w = layer_weights(spec, torch.device("cpu"))
    l2 = 1 << 20
    copies = gpu_layer_ab.preamble_weight_copies(spec, w, l2)
    assert len(copies) == bench.preamble_copies_beyond_l2(spec, l2)
    assert len(copies) * bench_layers.preamble_bytes(spec) >= bench.L2_ROTATION_FACTOR * l2
    routers = {c.router_weight.data_ptr() for c in copies} | {w.router_weight.data_ptr()}
    assert len(routers) == len(copies) + 1
    assert all(torch.equal(c.router_weight, w.router_weight) and c.w_down is w.w_down for c in copies)
    if spec.rms_norm:
        assert len({c.norm_weight.data_ptr() for c in copies}) == len(copies)
