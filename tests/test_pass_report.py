"""The match record reaches users three ways: the backend's report object, the "moe_fusion"
logger, and a structured-trace artifact; install() puts the pass into backend="inductor"."""
import logging

import torch

import moe_fusion
from moe_fusion.passes import report as report_module
from moe_fusion.tools import example_models


def _run(model, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        x = torch.randn(3, example_models.HIDDEN)
        return torch.compile(model, backend=backend, dynamic=True)(x), model(x)


def test_logger_and_structured_trace_carry_the_record(caplog, monkeypatch):
    artifacts = []

    def fake_trace(name, metadata_fn=None, payload_fn=None, **kwargs):
        metadata = metadata_fn() if metadata_fn else {}
        if metadata.get("name") == report_module.TRACE_ARTIFACT:
            artifacts.append((name, metadata, payload_fn()))

    monkeypatch.setattr(torch._logging, "trace_structured", fake_trace)
    with caplog.at_level(logging.INFO, logger="moe_fusion"):
        _run(example_models.build("gpt_fast"), moe_fusion.MoEFusionBackend(codegen=False))
    assert any("matched" in r.getMessage() for r in caplog.records if r.name == "moe_fusion")
    assert artifacts and artifacts[0][0] == "artifact" and '"status": "matched"' in artifacts[0][2]


def test_install_adds_the_pass_to_the_inductor_backend():
    before = torch._inductor.config.post_grad_custom_post_pass
    moe_fusion.last_report().clear()
    with moe_fusion.installed() as report, torch._inductor.config.patch(fx_graph_cache=False):
        got, expected = _run(example_models.build("gpt_fast"), "inductor")
    assert torch._inductor.config.post_grad_custom_post_pass is before
    assert report.matched == 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
