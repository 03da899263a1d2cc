"""benchmarks/gpu_layer_by_hits.py: the layer timed on inputs sorted by the local experts their routing hits."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gpu_layer_by_hits  # noqa: E402
from moe_fusion.tools import bench  # noqa: E402


def test_the_expectation_weights_each_hit_count_and_extrapolates_the_rare_ones():
    """P(h) T(h) over the timed counts; h = 3 has no time and is charged at the line through h = 1 and 2
    (20 + 10 per expert: 40); a timed count that no call has weighs nothing."""
    shares = {0: 0.5, 1: 0.1, 2: 0.2, 3: 0.2}
    us, extrapolated = gpu_layer_by_hits.expected_us({0: 12.0, 1: 20.0, 2: 30.0}, shares)
    assert us == pytest.approx(0.5 * 12 + 0.1 * 20 + 0.2 * 30 + 0.2 * 40)
    assert extrapolated == pytest.approx(0.2)
    us, extrapolated = gpu_layer_by_hits.expected_us({0: 12.0, 1: 20.0, 2: 30.0, 3: 35.0, 7: 1000.0}, shares)
    assert us == pytest.approx(0.5 * 12 + 0.1 * 20 + 0.2 * 30 + 0.2 * 35) and extrapolated == 0


def _shape_bench(seed=0, sets=4):
    cfg = bench.Config(device=torch.device("cpu"), shapes=[], ms=[2], parts=[], dtypes=[], variants=["moe_fusion"],
                       sets=sets, seconds_per_point=0.01, variant_budget=1e9, max_call_ms=1e4, seed=seed)
    return bench.ShapeBench(cfg, bench.shape_spec(cfg, "tiny-ep", "bf16"))


def test_every_sorted_input_hits_its_count_when_routed_alone():
    """Candidates are routed 1024 rows at a time; each kept input, routed on its own as the bench routes it,
    hits exactly the local experts of its class, and several classes are found."""
    sb = _shape_bench()
    with torch.no_grad():
        found = gpu_layer_by_hits.sets_by_hits(sb, 2, sets=4, candidates=600)
        assert len(found) >= 3
        for h, xs in found.items():
            assert len(xs) == 4
            for x in xs:
                ids = sb.layer.preamble(x)[1]
                assert bench.distinct_local_experts(sb.spec, ids, sb.layer.experts.expert_map) == h


def test_the_inputs_go_round_weight_copies_of_their_own_preamble_and_shared_tensors():
    """Copy i has its own router, norm and shared-expert tensors with the same values (so the same routing) and
    shares the routed experts; the inputs take copies 0, 1, 2, 0, 1; on the CPU (no L2 to leave) one copy."""
    sb = _shape_bench()
    weights = gpu_layer_by_hits.weight_rotation(sb, 2, 3)
    assert len(weights) == 3 and weights[0] is sb.weights
    for w in weights[1:]:
        for name in ("router_weight", "shared_gate", "shared_down"):
            assert getattr(w, name).data_ptr() != getattr(sb.weights, name).data_ptr()
            assert torch.equal(getattr(w, name), getattr(sb.weights, name))
        assert w.w_gate.data_ptr() == sb.weights.w_gate.data_ptr()
    xs = [torch.randn(2, sb.spec.hidden_size) for _ in range(5)]
    inputs = gpu_layer_by_hits.with_weights([(x,) for x in xs], weights)
    assert [x for x, _ in inputs] == xs and [w for _, w in inputs] == [weights[i] for i in (0, 1, 2, 0, 1)]
    assert len(gpu_layer_by_hits.weight_rotation(sb, 2, 0)) == 1


def test_a_cpu_run_writes_rows_per_hit_count_and_summarizes(tmp_path):
    out = tmp_path / "run"
    assert gpu_layer_by_hits.main(["--cpu", "--out", str(out), "--shape", "tiny-ep", "--dtype", "bf16", "--m", "1",
                                   "--sets", "2", "--candidates", "64", "--seconds-per-point", "0.01"]) == 0
    run = json.loads((out / "by_hits.json").read_text())
    assert run["meta"]["weight_copies"] == {"seed 0 M=1": 1}
    assert {r["hits"] for r in run["rows"]} == {r["distinct_experts"] for r in run["rows"]}
    assert all(r["us"] > 0 and r["variant"] == "plan" for r in run["rows"])
    md = tmp_path / "table.md"
    assert gpu_layer_by_hits.main(["--summarize", str(out / "by_hits.json"), "--routers", "20",
                                   "--markdown", str(md)]) == 0
    (row,) = gpu_layer_by_hits.summarize(run, routers=20)
    assert row["m"] == 1 and 0 < row["expected_us"] and "| tiny-ep | bf16 | plan | 1 |" in md.read_text()


def test_gpu_work_other_than_kernels_is_listed_between_two_calls(tmp_path):
    """_other_gpu_work: memsets and copies inside [t0, t1] µs after the trace's first kernel, and nothing else."""
    events = [dict(cat="kernel", name="_norm_quant_kernel", ts=1000.0, dur=2.0),
              dict(cat="gpu_memset", name="Memset (Device)", ts=1031.5, dur=0.5),
              dict(cat="gpu_memcpy", name="Memcpy DtoD", ts=1090.0, dur=0.5),
              dict(cat="kernel", name="layer_output_kernel", ts=1030.0, dur=1.0),
              dict(cat="cpu_op", name="aten::empty", ts=1032.0, dur=1.0)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert gpu_layer_by_hits._other_gpu_work(str(path), 20.0, 40.0) == ["gpu_memset Memset (Device) at 11.5 us"]


def _kernel(name, start, end, stream=7):
    return dict(name=name, stream=stream, start_us=start, end_us=end)


def _replay():
    """A profiled replay as summarize_section lists it: a stray kernel, then three layer calls."""
    return [_kernel("memset_kernel", 0.0, 1.0),
            _kernel("_norm_quant_kernel", 2.0, 4.0), _kernel("expert_gemm1_kernel", 3.0, 20.0, stream=8),
            _kernel("_norm_quant_kernel", 32.0, 34.0), _kernel("layer_output_kernel", 60.0, 61.5),
            _kernel("_norm_quant_kernel", 63.5, 65.0)]


def test_a_replay_is_cut_into_calls_at_each_norm_and_the_middle_one_is_timed_from_its_start():
    calls = gpu_layer_by_hits.split_calls(_replay())
    assert [[k["start_us"] for k in call] for call in calls] == [[2.0, 3.0], [32.0, 60.0], [63.5]]
    middle, kernels = gpu_layer_by_hits.middle_call(calls)
    assert middle == 1
    assert [(k["name"], k["start_us"], k["end_us"]) for k in kernels] == [("_norm_quant_kernel", 0.0, 2.0),
                                                                         ("layer_output_kernel", 28.0, 29.5)]
    assert gpu_layer_by_hits.split_calls([_kernel("memset_kernel", 0.0, 1.0)]) == []
