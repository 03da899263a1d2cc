"""moe-fusion inspect on the tiny HF DeepSeek-V3: the layers it reports and its exit codes."""
import json

from moe_fusion.tools import inspect


def test_inspect_hf_deepseek_v3_reports_two_layers_and_exits_zero(capsys):
    assert inspect.main(["hf:deepseek_v3", "--expect", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[matched]") == 2 and "2 layer(s) matched" in out
    assert "n_group=4" in out and "moe_fusion.moe_layer" in out


def test_inspect_expect_above_the_real_count_fails(capsys):
    assert inspect.main(["hf:deepseek_v3", "--expect", "3"]) == 1
    assert "expected at least 3" in capsys.readouterr().err


def test_inspect_json_config_override_and_graphs(capsys):
    assert inspect.main(["hf:deepseek_v3", "--config", "n_group=2", "--config", "topk_group=1", "--json",
                         "--graphs"]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = [layer for g in report["graphs"] for layer in g["layers"]]
    assert report["matched"] == 2 and all(layer["spec"]["n_group"] == 2 for layer in layers)
    assert "aten.topk" in layers[0]["before"] and "moe_fusion.moe_layer" in layers[0]["after"]


def test_inspect_reports_why_not(capsys):
    assert inspect.main(["topk_sampler", "--expect", "1"]) == 1
    out = capsys.readouterr().out
    assert "[not matched]" in out and "not MoE routing" in out
