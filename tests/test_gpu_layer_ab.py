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


def test_router_seeds_give_each_input_set_a_router_of_its_own():
    """--router-seeds: per seed a new router, norm weight and bias (the same for the same seed), the experts
    shared; the layer's input sets go round them, at least 8 sets."""
    spec = bench_layers.SHAPES["tiny-ep"]
    w = layer_weights(spec, torch.device("cpu"))
    routers = [gpu_layer_ab.with_new_router(spec, w, seed) for seed in (1, 2, 3)]
    assert torch.equal(routers[0].router_weight, gpu_layer_ab.with_new_router(spec, w, 1).router_weight)
    assert len({r.router_weight.sum().item() for r in routers} | {w.router_weight.sum().item()}) == 4
    assert not torch.equal(routers[0].correction_bias, routers[1].correction_bias)
    assert not torch.equal(routers[0].norm_weight, routers[1].norm_weight)
    assert all(r.w_gate is w.w_gate and r.expert_map is w.expert_map for r in routers)
    assert abs(routers[0].router_weight.float().std().item() * spec.hidden_size ** 0.5 - 1) < 0.1
    sets = gpu_layer_ab.layer_sets(spec, 2, torch.device("cpu"), routers)
    assert len(sets) == 8 and all(s[2] is r for s, r in zip(sets, routers * 3))
    assert len(gpu_layer_ab.layer_sets(spec, 2, torch.device("cpu"), routers * 4)) == 12


def test_the_layer_part_calls_the_layer_once_per_input_set_with_that_sets_router(monkeypatch):
    """time_variant's layer part, its timing replaced by one call per set: each call gets its set's weights."""
    spec = bench_layers.SHAPES["tiny-ep"].replace(dtype="float16")  # the interpreter's bf16 dot is wrong
    w = layer_weights(spec, torch.device("cpu"))
    routers = [gpu_layer_ab.with_new_router(spec, w, seed) for seed in (1, 2)]
    seen = []
    monkeypatch.setattr(gpu_layer_ab.timing, "graph_replay_us",
                        lambda fn, sets: [fn(*s) for s in sets] and 1.0)
    monkeypatch.setattr(gpu_layer_ab.layer, "moe_layer", lambda spec, x, weights, plan: seen.append(weights))
    assert gpu_layer_ab.time_variant(spec, routers, 1, torch.device("cpu"), [], "layer") == 1.0
    assert len(seen) == 8 and all(a is b for a, b in zip(seen, routers * 4))
