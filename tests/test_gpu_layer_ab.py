"""benchmarks/gpu_layer_ab.py's variant settings, which need no GPU: parsed, resolved against the
lowering modules (an unknown attribute is an error, not a silent no-op) and undone after each variant."""
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_layer_ab  # noqa: E402
from moe_fusion.lowering import experts, layer  # noqa: E402


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
