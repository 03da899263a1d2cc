"""benchmarks/e2e_decode.py at its smallest on whatever device there is: the script that measures
issue 6's HF decode step runs, the pass matches the model's MoE layers, and in fp32 the compiled
model's greedy tokens are eager's."""
import json
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import e2e_decode  # noqa: E402


@pytest.mark.slow
def test_decode_step_smoke(tmp_path):
    import moe_fusion

    moe_fusion.last_report().clear()  # count this run's matches only
    out = tmp_path / "e2e.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert e2e_decode.main(["--config", "tiny", "--layers", "1", "--dtype", "float32", "--mode", "default",
                            "--batch", "2", "--new-tokens", "2", "--steps", "1", "--device", device,
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers_matched_over_compiles"] >= 1  # else moe_fusion would be Inductor timed twice
    (row,) = result["rows"]
    assert row["batch"] == 2
    for timing in ("us", "back_to_back_us"):
        assert row[f"moe_fusion_{timing}"] > 0 and row[f"inductor_{timing}"] > 0
    assert row["moe_fusion_tokens_equal_eager"] == 1.0
    assert row["moe_fusion_teacher_forced"]["agree"] == 1.0
    assert row["moe_fusion_teacher_forced"]["logits_rel_err"] < 1e-4
