"""benchmarks/routing_seeds.py: an expert-parallel layer's time at the expected routing from runs of several seeds."""
import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import routing_seeds  # noqa: E402
from moe_fusion.tools.bench_layers import SHAPES  # noqa: E402


def _run(seed_rows):
    return {"meta": {}, "rows": [dict(shape="tiny-ep", dtype="bf16", part="layer", variant="moe_fusion", m=m,
                                      distinct_experts=hits, us=us) for m, hits, us in seed_rows]}


def test_the_line_through_the_seeds_is_read_at_the_expected_hits(tmp_path):
    """Three seeds on µs = 10 + 5 * hits at M = 1 (plus one row without a time, which is left out); the
    expected hits at M = 1 are top_k * local / experts = 4 * 4 / 16 = 1, so the table reads 15 µs there."""
    runs = [_run([(1, 0.5, 12.5)]), _run([(1, 1.5, 17.5)]), _run([(1, 2.0, 20.0), (4, 2.0, None)])]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"seed{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "table.md"
    assert routing_seeds.main([str(p) for p in paths] + ["--markdown", str(out)]) == 0
    (row,) = routing_seeds.summary(runs)
    assert (row["m"], row["seeds"]) == (1, 3)
    assert row["intercept_us"] == pytest.approx(10) and row["us_per_expert"] == pytest.approx(5)
    assert row["expected_hits"] == pytest.approx(1.0) and row["us_at_expected"] == pytest.approx(15.0)
    row_text = "| tiny-ep | bf16 | layer | moe_fusion | 1 | 3 | 1.33 | 16.7 | 10.0 +5.0·hits | 1.00 | 15.0 |"
    assert row_text in out.read_text()


def test_expected_hits_of_several_tokens_lie_between_one_token_and_no_sharing():
    """Two tokens hit at least what one does and at most twice that (fewer when they share experts);
    the same draw gives the same estimate."""
    spec = SHAPES["tiny-ep"]
    one = routing_seeds.expected_local_hits(spec, 1)
    two = routing_seeds.expected_local_hits(spec, 2, routers=50)
    assert one < two < 2 * one
    assert two == routing_seeds.expected_local_hits(spec, 2, routers=50)


def test_a_custom_shape_is_read_from_the_run_and_an_unknown_one_has_no_expected_hits():
    """--shape custom: the bench's meta describes it (16 experts, 8 local, top-2: 1 local expert per token)."""
    custom = dict(dataclasses.asdict(SHAPES["tiny-ep"]), num_experts=16, num_local_experts=8, top_k=2)
    rows = [dict(shape="custom", dtype="bf16", part="layer", variant="moe_fusion", m=1, distinct_experts=h, us=us)
            for h, us in ((0.5, 12.5), (1.5, 17.5))]
    (row,) = routing_seeds.summary([{"meta": {"shapes": {"custom": custom}}, "rows": rows}])
    assert row["expected_hits"] == pytest.approx(1.0) and row["us_at_expected"] == pytest.approx(15.0)
    (row,) = routing_seeds.summary([{"meta": {}, "rows": rows}])
    assert row["expected_hits"] is None and row["us_at_expected"] is None
