"""benchmarks/gpu_overlap.py at its smallest on whatever device there is (the Triton interpreter on
the CPU), and its trace analysis on a chrome trace laid out the way torch.profiler writes one."""
import json
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import gpu_overlap  # noqa: E402


def test_overlap_smoke(tmp_path):
    assert gpu_overlap.main(["--smoke", "--out", str(tmp_path), "--m", "1"]) == 0
    result = json.loads((tmp_path / "overlap.json").read_text())
    assert [(r["dtype"], r["M"]) for r in result["rows"]] == [("bf16", 1), ("fp8", 1)]
    assert result["shared_on"] == "kernels"  # the layer's side stream runs no cuBLAS
    # tiny-ep: 4 of 16 experts local, 4 picked per token; one token hits 0 to 4 of them
    assert all(0 <= r["local_experts_hit"] <= 4 for r in result["rows"])
    text = (tmp_path / "overlap.md").read_text()
    assert "| bf16 | 1 |" in text and "| norm+shared |" in text and "ratio after norm" in text
    assert result["profiled"] == "pre+shared stream"


def test_overlap_smoke_with_an_fp8_shared_expert(tmp_path):
    """--shared-on kernels-fp8: the shared expert alone on x's fp8 groups, and after the preamble on the
    norm's; it rides on fp8 experts only."""
    assert gpu_overlap.main(["--smoke", "--out", str(tmp_path), "--m", "1", "--dtypes", "fp8",
                             "--shared-on", "kernels-fp8"]) == 0
    assert json.loads((tmp_path / "overlap.json").read_text())["shared_on"] == "kernels-fp8"
    with pytest.raises(SystemExit):
        gpu_overlap.main(["--smoke", "--out", str(tmp_path), "--dtypes", "bf16,fp8", "--shared-on", "kernels-fp8"])


def test_each_input_set_gets_its_own_preamble_and_shared_weights(tmp_path):
    """The rotation that keeps the shared expert's 44-88 MB out of L2 between timed calls: copies own
    their preamble and shared-expert tensors (same values), share the routed experts, and enough of
    them exceed L2 L2_ROTATION_FACTOR times."""
    from layer_cases import layer_weights

    spec = gpu_overlap.SHAPES["tiny-ep"]
    w = layer_weights(spec, "cpu", seed=0)
    copies = gpu_overlap.weight_copies(w, 3)
    assert copies[0] is w and len(copies) == 3
    for c in copies[1:]:
        for name in gpu_overlap.COPIED_WEIGHTS:
            if getattr(w, name) is not None:
                assert getattr(c, name).data_ptr() != getattr(w, name).data_ptr()
                assert torch.equal(getattr(c, name), getattr(w, name))
        assert c.w_gate is w.w_gate and c.w_down is w.w_down
    sets = gpu_overlap.with_weights(gpu_overlap.input_sets(spec, 2, "cpu", 5), copies)
    assert [s[2] for s in sets] == [copies[0], copies[1], copies[2], copies[0], copies[1]]
    dsv3_ep8 = gpu_overlap.SHAPES["dsv3-ep8"]
    l2 = 50 << 20
    fp8_copies = gpu_overlap.weight_copy_count(dsv3_ep8, True, l2)
    per_copy = gpu_overlap.preamble_bytes(dsv3_ep8) + gpu_overlap.shared_bytes(dsv3_ep8, True)
    assert (fp8_copies - 1) * per_copy < gpu_overlap.L2_ROTATION_FACTOR * l2 <= fp8_copies * per_copy
    assert gpu_overlap.weight_copy_count(dsv3_ep8, False, l2) < fp8_copies


def test_a_forked_shared_job_is_held_until_the_join(monkeypatch):
    """Freed at the fork, the job's buffers went to the preamble's allocations while the side stream still
    used them (session 31: an illegal address under graph replay). On the CPU the fork runs the job at once;
    what is checked is that the job is still alive when the join comes."""
    import weakref

    from layer_cases import layer_weights

    spec = gpu_overlap.SHAPES["tiny-ep"].replace(dtype="float16")
    sets = gpu_overlap.with_weights(gpu_overlap.input_sets(spec, 1, "cpu", 1), [layer_weights(spec, "cpu", seed=0)])
    block_m = gpu_overlap.layer.plan_layer(spec, 1, torch.device("cpu")).expert_config.block_m
    forked, alive_at_join = [], []

    def fork(device, run):
        forked.append(weakref.ref(run.__self__))
        run()

    monkeypatch.setattr(gpu_overlap.streams, "fork", fork)
    monkeypatch.setattr(gpu_overlap.streams, "join", lambda device: alive_at_join.append(forked[-1]() is not None))
    for name in ("pre+shared stream", "pre+shared unblocked"):
        gpu_overlap.variant_fn(name, spec, block_m)(*sets[0])
    assert len(forked) == 2 and alive_at_join == [True, True]


def _kernel(name, stream, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream, "args": {"stream": stream}}


def test_trace_summary_measures_the_overlap_inside_its_range():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "graph replay", "ts": 1000.0, "dur": 200.0},
        _kernel("_norm_quant_kernel", 7, 1010.0, 2.0),
        _kernel("nvjet_gemm_bf16", 20, 1012.0, 30.0),  # shared expert, side stream
        _kernel("_router_route_align_kernel", 7, 1013.0, 10.0),
        _kernel("silu_kernel", 20, 1042.0, 3.0),
        _kernel("_norm_quant_kernel", 7, 1500.0, 2.0),  # outside the range: another call
    ]}
    s = gpu_overlap.summarize_section(trace, "graph replay")
    assert len(s["kernels"]) == 4 and s["kernels"][0]["start_us"] == 0.0
    assert s["preamble_busy_us"] == 12.0 and s["shared_busy_us"] == 33.0
    assert s["overlap_us"] == 10.0 and s["span_us"] == 35.0
    assert s["preamble_streams"] == [7] and s["shared_streams"] == [20]
    assert "error" in gpu_overlap.summarize_section(trace, "eager call")


def test_trace_summary_keeps_each_launchs_resources():
    kernel = _kernel("expert_gemm2_kernel", 7, 1010.0, 2.0)
    kernel["args"].update({"grid": [224, 1, 1], "registers per thread": 128, "shared memory": 74240})
    trace = {"traceEvents": [{"ph": "X", "cat": "user_annotation", "name": "graph replay", "ts": 1000.0, "dur": 20.0},
                             kernel, _kernel("_norm_quant_kernel", 7, 1013.0, 2.0)]}
    first, second = gpu_overlap.summarize_section(trace, "graph replay")["kernels"]
    assert (first["programs"], first["registers"], first["shared_bytes"]) == (224, 128, 74240)
    assert (second["programs"], second["registers"], second["shared_bytes"]) == (None, None, None)


def test_interval_overlap():
    assert gpu_overlap.overlap([(0, 10), (5, 12)], [(11, 20), (30, 40)]) == 1
    assert gpu_overlap.overlap([(0, 1)], [(2, 3)]) == 0
    assert gpu_overlap.covered([(0, 10), (5, 12), (20, 21)]) == 13
