"""benchmarks/gpu_capture_spread.py: the same layer captured in several CUDA graphs, each timed and profiled."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_capture_spread  # noqa: E402
import gpu_layer_by_hits  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402


def test_a_replay_summary_gives_the_periods_streams_and_middle_call():
    """Calls start at 2, 32 and 63.5 µs: periods 30 and 31.5; streams as strings, whatever their type."""
    kernels = [dict(name="_norm_quant_kernel", stream=7, start_us=2.0, end_us=4.0),
               dict(name="expert_gemm1_kernel", stream="8", start_us=3.0, end_us=20.0),
               dict(name="_norm_quant_kernel", stream=7, start_us=32.0, end_us=34.0),
               dict(name="_norm_quant_kernel", stream=7, start_us=63.5, end_us=65.0)]
    calls = gpu_layer_by_hits.split_calls(kernels)
    assert gpu_capture_spread.call_periods(calls) == [30.0, 31.5]
    summary = gpu_capture_spread.replay_summary(calls)
    assert (summary["period_median_us"], summary["period_min_us"], summary["period_max_us"]) == (30.75, 30.0, 31.5)
    assert summary["streams"] == ["7", "8"]
    assert [k["start_us"] for k in summary["middle_call"]] == [0.0]
    one = gpu_capture_spread.replay_summary(calls[:1])
    assert one["period_median_us"] is None and one["middle_call"][1]["end_us"] == 18.0


def test_it_refuses_to_run_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs CUDA"):
        gpu_capture_spread.main(["--out", str(tmp_path)])


@pytest.mark.gpu
def test_a_captured_graph_replays_every_call():
    """capture_calls: one call per input set in the graph (each replay rewrites every output), the outputs'
    addresses reported; replayed_call_us times it."""
    xs = [torch.randn(4, 8, device="cuda") for _ in range(3)]
    outs = [torch.empty(4, 8, device="cuda") for _ in range(3)]

    def fn(i):
        return torch.mul(xs[i], 2.0, out=outs[i])

    graph, addresses = timing.capture_calls(fn, [(i,) for i in range(3)])
    assert addresses == [o.data_ptr() for o in outs]
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for x, o in zip(xs, outs):
        assert torch.equal(o, 2.0 * x)
    assert timing.replayed_call_us(graph, 3, replays=2, batches=2) > 0


@pytest.mark.gpu
def test_a_small_run_writes_a_row_per_capture(tmp_path):
    assert gpu_capture_spread.main(["--out", str(tmp_path), "--shape", "tiny-ep", "--dtype", "bf16", "--hits", "1",
                                    "--captures", "2", "--sets", "4", "--candidates", "256"]) == 0
    rows = json.loads((tmp_path / "capture_spread.json").read_text())["hits"]["1"]
    assert len(rows) == 2
    for r in rows:
        assert r["us"] > 0 and r["us_after_profile"] > 0 and r["first_output"].startswith("0x") and r["pool"]
        assert r["period_median_us"] > 0 and r["middle_call"][0]["name"].startswith("_norm_quant_kernel")


def test_the_pool_segments_are_those_of_the_graphs_pool(monkeypatch):
    segments = [dict(address=0x7f0000000000, total_size=2 << 20, segment_pool_id=(0, 0)),
                dict(address=0x7f0000200000, total_size=20 << 20, segment_pool_id=(1, 3)),
                dict(address=0x7f0001600000, total_size=2 << 20, segment_pool_id=(1, 3))]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    assert gpu_capture_spread.pool_segments((1, 3)) == ["0x7f0000200000:20971520", "0x7f0001600000:2097152"]


@pytest.mark.parametrize("placement", sorted(gpu_capture_spread.PLACEMENTS))
def test_each_placement_moves_the_buffers_as_it_says(monkeypatch, placement):
    """pad: the i-th capture is padded by i steps; eager: every input runs before each capture; keep: no graph
    is freed before the last capture; same: none of these."""
    events, alive = [], [0]

    class Graph:
        def __init__(self):
            alive[0] += 1

        def __del__(self):
            alive[0] -= 1

    def measure(fn, inputs, trace_path, pad_bytes=0):
        events.append(("capture", pad_bytes, alive[0]))
        return dict(us=1.0), Graph()

    monkeypatch.setattr(gpu_capture_spread, "measure_capture", measure)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    rows = gpu_capture_spread.placed_captures(lambda i: events.append(("call", i)), [(0,), (1,)], "t.json",
                                              placement, 3)
    assert len(rows) == 3
    captures = [e for e in events if e[0] == "capture"]
    pads = [0, gpu_capture_spread.PAD_STEP, 2 * gpu_capture_spread.PAD_STEP] if placement == "pad" else [0, 0, 0]
    assert [c[1] for c in captures] == pads
    assert [c[2] for c in captures] == ([0, 1, 2] if placement == "keep" else [0, 0, 0])
    calls = [e for e in events if e[0] == "call"]
    assert calls == ([("call", 0), ("call", 1)] * 3 if placement == "eager" else [])
