"""The measured shared-expert plan (lowering/shared_plan.py, shared_plan.json) and its use by the layer plan."""
import json
import os
import sys

import pytest
import torch

from moe_fusion.lowering import experts, layer, shared_plan
from moe_fusion.tools.bench_layers import SHAPES

H100 = "NVIDIA H100 80GB HBM3"


def _row(shape, dtype, variant, m, us):
    return dict(shape=shape, dtype=dtype, part="layer", variant=variant, m=m, us=us)


def test_best_strategies_take_the_fastest_allowed_mean():
    rows = [
        _row("dsv3-ep8", "bf16", "stream", 1, 140.0), _row("dsv3-ep8", "bf16", "fused", 1, 100.0),
        _row("dsv3-ep8", "bf16", "fused", 64, 590.0), _row("dsv3-ep8", "bf16", "stream", 64, 560.0),
        _row("dsv3-ep8", "bf16", "inline", 64, 500.0), _row("dsv3-ep8", "bf16", "inline", 64, 640.0),  # mean 570
        _row("dsv3-ep8", "fp8", "fused", 1, 10.0), _row("dsv3-ep8", "fp8", "inline", 1, 120.0),
        _row("dsv3-ep8", "fp8", "stream", 1, 126.0), _row("dsv3-ep8", "fp8", "stream+kernel-hquant", 1, 1.0),
        _row("dsv3-ep8", "fp8", "stream-fp8", 4, 70.0), _row("dsv3-ep8", "fp8", "fused", 4, 80.0),
        _row("dsv3-ep8", "fp8", "inline", 4, 60.0), _row("dsv3-ep8", "fp8", "stream-kernels", 16, 150.0),
        _row("dsv3-ep8", "fp8", "stream", 16, 160.0), _row("dsv3-ep8", "fp8", "stream-fp8", 16, 140.0),
    ]
    plans = shared_plan.best_strategies(rows, SHAPES)
    bf16 = shared_plan.shape_key(SHAPES["dsv3-ep8"])
    fp8_spec = SHAPES["dsv3-ep8"].replace(quant="fp8_block")
    fp8, fp8_shared = shared_plan.shape_key(fp8_spec), shared_plan.shape_key(fp8_spec, fp8_shared=True)
    assert plans[bf16] == {"1": "fused", "64": "stream"}
    # An fp8 shared expert changes the numerics: those rows make their own entries; unknown variants are ignored.
    assert plans[fp8] == {"1": "inline", "4": "inline", "16": "stream-kernels"}
    assert plans[fp8_shared] == {"1": "fused", "4": "stream", "16": "stream"}


def test_lookup_takes_the_next_measured_m(monkeypatch):
    spec = SHAPES["dsv3-ep8"]
    table = {H100: {shared_plan.shape_key(spec): {"1": "inline", "4": "fused", "64": "stream"}}}
    monkeypatch.setattr(shared_plan, "_table", lambda path: table)
    assert [shared_plan.lookup(spec, m, H100) for m in (1, 2, 4, 5, 64, 500)] == [
        "inline", "fused", "fused", "stream", "stream", "stream"]
    assert shared_plan.lookup(spec, 1, "another GPU") is None
    assert shared_plan.lookup(SHAPES["dsv3"], 1, H100) is None
    # The H200 has the H100's SMs: the H100's measurements serve it until it has its own.
    assert shared_plan.lookup(spec, 4, "NVIDIA H200") == "fused"
    table["NVIDIA H200"] = {shared_plan.shape_key(spec): {"4": "inline"}}
    assert shared_plan.lookup(spec, 4, "NVIDIA H200") == "inline"


def test_log_rows_parse(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("noise\ndsv3-ep8  fp8  layer   inline                 M=  1     119.5 us 13 kernels 41%\n"
                    "dsv3-ep8  fp8  layer   stream-fp8             M=  4      70.5 us 11 kernels 80%\n"
                    "dsv3  fp8  layer   stream-kernels         M=  4     476.5 us 11 kernels 90%\n"
                    "dsv3-ep8  fp8  layer   stream-late-fp8        M=  1      43.9 us 11 kernels 70% seed 3\n")
    assert shared_plan.rows_from_log(str(path)) == [_row("dsv3-ep8", "fp8", "inline", 1, 119.5),
                                                    _row("dsv3-ep8", "fp8", "stream-fp8", 4, 70.5),
                                                    _row("dsv3", "fp8", "stream-kernels", 4, 476.5),
                                                    _row("dsv3-ep8", "fp8", "stream-late-fp8", 1, 43.9)]


def test_a_measured_kernels_strategy_plans_a_model_dtype_launch_of_the_expert_kernels(monkeypatch):
    monkeypatch.setattr(experts, "device_facts", lambda device: (H100, 132))
    monkeypatch.setattr(layer.options, "shared_expert", None)
    spec = SHAPES["dsv3"].replace(quant="fp8_block")
    table = {H100: {shared_plan.shape_key(spec): {"4": "stream-kernels"},
                    shared_plan.shape_key(spec, fp8_shared=True): {"4": "inline"}}}
    monkeypatch.setattr(shared_plan, "_table", lambda path: table)
    monkeypatch.setattr(experts, "expert_config", lambda *a: None)
    cuda = torch.device("cuda")
    plan = layer.plan_layer(spec, 4, cuda)
    assert (plan.shared_expert, plan.shared_on_kernels, plan.shared_fp8) == ("stream", True, False)
    monkeypatch.setattr(layer.options, "shared_fp8", True)
    plan = layer.plan_layer(spec, 4, cuda)
    assert (plan.shared_expert, plan.shared_on_kernels, plan.shared_fp8) == ("inline", True, True)
    # A shared width the kernels cannot take: the plan's kernels entry is not used, and without the
    # kernels the shared expert stays off the side stream (cuBLAS there would allocate: streams.py).
    odd = spec.replace(shared_intermediate_size=3000)
    monkeypatch.setattr(layer.options, "shared_fp8", False)
    for entry in ("stream-kernels", "stream"):
        table[H100][shared_plan.shape_key(odd)] = {"4": entry}
        plan = layer.plan_layer(odd, 4, cuda)
        assert (plan.shared_expert, plan.shared_on_kernels) == ("inline", False)


def test_the_side_stream_runs_the_shared_expert_on_the_expert_kernels_only(monkeypatch):
    """"stream" from the table or from the user is the expert kernels' launch on the side stream:
    cuBLAS allocates its workspace lazily per stream, which the side stream must not do."""
    monkeypatch.setattr(experts, "device_facts", lambda device: (H100, 132))
    monkeypatch.setattr(experts, "expert_config", lambda *a: None)
    spec = SHAPES["dsv3-ep8"].replace(quant="fp8_block")
    cuda = torch.device("cuda")
    monkeypatch.setattr(shared_plan, "_table", lambda path: {H100: {shared_plan.shape_key(spec): {"4": "stream"}}})
    for asked in (None, "stream"):
        monkeypatch.setattr(layer.options, "shared_expert", asked)
        plan = layer.plan_layer(spec, 4, cuda)
        assert (plan.shared_expert, plan.shared_on_kernels, plan.shared_fp8) == ("stream", True, False)
    with pytest.raises(ValueError, match="side stream"):
        layer.LayerPlan(plan.expert_config, "stream", False, False, shared_on_kernels=False)


def test_stream_late_is_the_side_stream_with_its_gemm2_after_the_routed_gemm1(monkeypatch):
    monkeypatch.setattr(experts, "device_facts", lambda device: (H100, 132))
    monkeypatch.setattr(experts, "expert_config", lambda *a: None)
    spec = SHAPES["dsv3-ep8"].replace(quant="fp8_block")
    cuda = torch.device("cuda")
    monkeypatch.setattr(layer.options, "shared_fp8", True)
    monkeypatch.setattr(shared_plan, "_table", lambda path: {H100: {shared_plan.shape_key(spec, True): {"1": "stream-late"}}})
    for asked in (None, "stream-late"):
        monkeypatch.setattr(layer.options, "shared_expert", asked)
        plan = layer.plan_layer(spec, 1, cuda)
        assert (plan.shared_expert, plan.shared_on_kernels, plan.shared_fp8, plan.shared_gemm2_late) == (
            "stream", True, True, True)
    monkeypatch.setattr(layer.options, "shared_expert", "stream")
    assert not layer.plan_layer(spec, 1, cuda).shared_gemm2_late
    for asked in ("stream", "stream-late", "stream-kernels"):  # off CUDA: the same launch, in order
        monkeypatch.setattr(layer.options, "shared_expert", asked)
        plan = layer.plan_layer(spec, 1, torch.device("cpu"))
        assert (plan.shared_expert, plan.shared_on_kernels, plan.shared_gemm2_late) == ("inline", True, False)
    with pytest.raises(ValueError, match="late"):
        layer.LayerPlan(None, "inline", False, True, shared_on_kernels=True, shared_gemm2_late=True)


def test_layer_plan_follows_the_shipped_table(monkeypatch):
    monkeypatch.setattr(experts, "device_facts", lambda device: (H100, 132))
    monkeypatch.setattr(layer.options, "shared_expert", None)
    cuda = torch.device("cuda")
    ep8_fp8 = SHAPES["dsv3-ep8"].replace(quant="fp8_block")
    assert layer._shared_strategy(ep8_fp8, 1, cuda) == "stream-late"
    assert layer._shared_strategy(SHAPES["dsv3"].replace(quant="fp8_block"), 16, cuda) == "inline-kernels"
    monkeypatch.setattr(layer.options, "shared_fp8", True)  # the fp8-shared entries
    assert [layer._shared_strategy(ep8_fp8, m, cuda) for m in (1, 2, 8, 64)] == ["stream-late", "stream", "fused",
                                                                                 "stream"]
    plan = layer.plan_layer(ep8_fp8, 1, cuda)
    assert plan.shared_fp8 and plan.shared_gemm2_late
    monkeypatch.setattr(layer.options, "shared_fp8", False)
    assert layer._shared_strategy(SHAPES["dsv3-ep8"], 3, cuda) == "fused"
    assert layer._shared_strategy(SHAPES["dsv3-ep8"], 64, cuda) == "stream"
    # A shape the table does not cover: the rule (fused for bf16 up to FUSED_SHARED_MAX_M).
    other = SHAPES["dsv3-ep8"].replace(num_local_experts=16)
    assert layer._shared_strategy(other, layer.FUSED_SHARED_MAX_M, cuda) == "fused"
    assert layer._shared_strategy(other, layer.FUSED_SHARED_MAX_M + 1, cuda) == "stream"


def test_strategy_script_rows_feed_the_table(tmp_path):
    """benchmarks/gpu_shared_strategies.py's plumbing on the CPU (the reference runs; the times mean
    nothing): every variant gives a row, an fp8 shared expert's floor counts it in fp8, and
    best_strategies reads the rows."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import gpu_shared_strategies

    import routing_seeds

    gpu_shared_strategies.main(["--cpu", "--out", str(tmp_path), "--shapes", "tiny", "--dtypes", "fp8", "--m", "1",
                                "--seconds-per-point", "0", "--seeds", "0,1", "--sets", "2"])
    run = json.loads((tmp_path / "shared_strategies.json").read_text())
    rows = run["rows"]
    assert sorted(r["seed"] for r in rows if r["variant"] == "stream") == [0, 1]
    # routing_seeds fits the rows over the seeds: one (hits, µs) pair per seed and variant
    assert {len(pairs) for pairs in routing_seeds.points([run]).values()} == {2}
    by_variant = {r["variant"]: r for r in rows if r["seed"] == 0}
    assert set(by_variant) == set(layer.SHARED_STRATEGIES) | {"stream-fp8", "stream-late-fp8", "inline-fp8"}
    assert by_variant["stream-fp8"]["bytes"] < by_variant["stream"]["bytes"] == by_variant["stream-kernels"]["bytes"]
    assert by_variant["fused"]["bytes"] == by_variant["stream-fp8"]["bytes"]
    tiny_fp8 = shared_plan.shape_key(SHAPES["tiny"].replace(quant="fp8_block"))
    assert set(shared_plan.best_strategies(rows, SHAPES)[tiny_fp8]) == {"1"}
