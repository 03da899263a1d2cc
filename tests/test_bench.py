"""``moe-fusion bench``: its baseline layers compute the reference semantics, and a run writes the
rows it promises (CPU smoke run here; a tiny CUDA-graph run on the GPU)."""
import json

import pytest
import torch

from moe_fusion.lowering import reference
from moe_fusion.tools import bench, bench_report
from moe_fusion.tools.bench_layers import SHAPES, build_layer, canonical_weights, expert_bytes, shared_bytes

TINY = SHAPES["tiny"].replace(dtype="float32")
BASELINE_SPECS = {
    "dsv3_like": TINY,
    "dsv3_like_ep": TINY.replace(num_local_experts=4),
    "softmax_no_norm": TINY.replace(rms_norm=False, router_fp32=False, scoring="softmax", correction_bias=False,
                                    n_group=1, topk_group=1, renormalize_eps=0.0, routed_scaling_factor=1.0,
                                    shared_intermediate_size=0),
    "fp8_ep": TINY.replace(num_local_experts=8, quant="fp8_block"),
}


def _dequantized(spec, w):
    """The fp8 layer's weights in fp32 and the unquantized spec: what the fp8 baseline computes."""
    plain = spec.replace(quant="none")
    for name in ("w_gate", "w_up", "w_down"):
        setattr(w, name, reference.dequantize_fp8_blocks(getattr(w, name), getattr(w, name + "_scale")))
        setattr(w, name + "_scale", None)
    return plain, w


@pytest.mark.parametrize("name", BASELINE_SPECS)
def test_baseline_layer_computes_the_reference(name):
    spec = BASELINE_SPECS[name]
    layer = build_layer(spec, "cpu", seed=3)
    w = canonical_weights(layer)
    ref_spec, ref_w = _dequantized(spec, w) if spec.fp8 else (spec, w)
    for m in (1, 5, 33):
        x = torch.randn(m, spec.hidden_size)
        with torch.no_grad():
            normed, ids, weights = layer.preamble(x)
            out = layer(x)
            experts = layer.experts(normed, ids, weights)
        ref_normed, ref_ids, ref_weights = reference.moe_preamble(ref_spec, x, ref_w)
        torch.testing.assert_close(normed, ref_normed)
        order, ref_order = ids.argsort(-1), ref_ids.long().argsort(-1)
        assert torch.equal(ids.gather(1, order), ref_ids.long().gather(1, ref_order))
        torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order))
        torch.testing.assert_close(experts, reference.routed_experts(ref_spec, ref_normed, ref_ids, ref_weights, ref_w))
        torch.testing.assert_close(out, reference.moe_layer(ref_spec, x, ref_w))
        assert out.abs().sum() > 0  # not trivially zero, even with experts on other ranks


def test_floor_counts_the_shared_expert_as_the_plan_reads_it():
    """dsv3's shared expert has the routed width: in fp8 it is one fp8 expert's bytes (weights and
    128x128 block scales), in the model dtype twice the weight bytes."""
    spec = SHAPES["dsv3"].replace(quant="fp8_block")
    H, I = spec.hidden_size, spec.shared_intermediate_size
    assert I == spec.intermediate_size
    assert shared_bytes(spec, fp8=True) == expert_bytes(spec) == 3 * H * I + 4 * 3 * (H // 128) * (I // 128)
    assert shared_bytes(spec) == 3 * H * I * 2


def test_canonical_weights_are_views_of_the_layer():
    layer = build_layer(SHAPES["tiny"], "cpu")
    w = canonical_weights(layer)
    assert w.w_gate.data_ptr() == layer.experts.gate_up_proj.data_ptr()
    assert w.w_up.untyped_storage().data_ptr() == layer.experts.gate_up_proj.untyped_storage().data_ptr()
    assert w.router_weight is layer.preamble.gate.weight


CUSTOM = ["--shape", "custom", "--hidden", "128", "--experts", "8", "--top-k", "2", "--intermediate", "128",
          "--shared-intermediate", "128", "--scoring", "sigmoid", "--correction-bias", "--n-group", "2",
          "--topk-group", "1", "--routed-scale", "2.5", "--rms-norm", "--router-fp32"]
# bf16 moe_fusion vs the bf16 baseline: rounding only; fp8: the reference also rounds activations to fp8.
TOLERANCE = {"bf16": 3e-2, "fp8": 1.5e-1}


def _check_rows(result, shapes, dtypes, parts, ms, variants, gpu):
    rows = result["rows"]
    keys = {(r["shape"], r["dtype"], r["part"], r["m"], r["variant"]) for r in rows}
    expected = {(s, d, p, m, v) for s in shapes for d in dtypes for p in parts for m in ms for v in variants}
    assert keys == expected and len(rows) == len(expected)
    for r in rows:
        assert r["us"] is not None and r["us"] > 0, r
        assert r["note"] == "", r
        assert r["bytes"] > 0 and r["floor_us"] > 0 and r["frac_copy_bw"] > 0
        # A near-tie routed differently (rounding differs between variants) moves one token a lot.
        assert r["tokens_off_vs_eager"] <= (0.25 if r["m"] >= 4 else 0.5), r
        if r["tokens_off_vs_eager"] == 0:
            assert r["rel_err_vs_eager"] < TOLERANCE[r["dtype"]], r
        assert (r["kernels"] is not None and r["kernels"] >= 1) if gpu else r["kernels"] is None
        if r["part"] != "preamble":
            assert 0 <= r["distinct_experts"] <= r["local_experts"]
    meta = result["meta"]
    assert meta["torch"] == torch.__version__ and meta["date"] and meta["triton"]
    assert meta["copy_bandwidth_bytes_per_s"] > 0


def test_cpu_smoke_run_writes_the_expected_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    argv = CUSTOM + ["--cpu", "--m", "1,3", "--dtype", "bf16,fp8", "--seconds-per-point", "0.01", "--sets", "2",
                     "--json", str(out), "--markdown", str(md), "--summary-m", "3"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    _check_rows(result, ["custom"], ["bf16", "fp8"], list(bench.PARTS), [1, 3], ["eager", "moe_fusion"], gpu=False)
    assert "wall_clock_cpu" in result["meta"]["timing"]
    stdout = capsys.readouterr().out
    assert "custom · fp8 · layer" in stdout and "summary" in stdout
    assert md.read_text().count("| custom |") == 2 * 3 * 2


def test_without_cuda_it_says_so_and_exits_cleanly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--shape", "dsv3"]) == 0
    assert "no CUDA device" in capsys.readouterr().err


def test_bad_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="unknown shape"):
        bench.main(["--cpu", "--shape", "dsv4"])
    with pytest.raises(SystemExit, match="too big for the CPU"):
        bench.main(["--cpu", "--shape", "dsv3"])
    with pytest.raises(SystemExit, match="--hidden"):
        bench.main(["--cpu", "--shape", "custom", "--experts", "8", "--top-k", "2", "--intermediate", "64"])


def test_from_json_merges_runs_later_rows_winning(tmp_path, capsys):
    def result(us, variant):
        row = dict(shape="tiny", dtype="bf16", part="layer", m=1, variant=variant, us=us, kernels=3,
                   distinct_experts=2.0, bytes=1000, floor_us=1.0, frac_copy_bw=1.0 / us, rel_err_vs_eager=0.0,
                   first_call_s=0.1, note="", local_experts=16)
        return dict(meta=dict(date="d", torch="t", triton="tr", device="dev", copy_bandwidth_bytes_per_s=1e12), rows=[row])

    paths = []
    for i, r in enumerate((result(10.0, "eager"), result(5.0, "eager"), result(7.0, "moe_fusion"))):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    merged = tmp_path / "merged.json"
    assert bench.main(["--from-json", ",".join(map(str, paths)), "--json", str(merged)]) == 0
    rows = json.loads(merged.read_text())["rows"]
    assert sorted((r["variant"], r["us"]) for r in rows) == [("eager", 5.0), ("moe_fusion", 7.0)]
    assert "tiny · bf16 · layer" in capsys.readouterr().out


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(shape="tiny", dtype="bf16", part=p, m=m, variant=v, us=float(m + i), floor_us=0.5)
            for p in ("experts", "layer") for m in (1, 2, 4) for i, v in enumerate(("eager", "moe_fusion"))]
    path = tmp_path / "plot.png"
    bench_report.plot(dict(meta={}, rows=rows), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_gpu_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--shape", "tiny,tiny-ep", "--m", "1,4", "--dtype", "bf16,fp8", "--variants", "eager,moe_fusion",
            "--seconds-per-point", "0.02", "--json", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    _check_rows(result, ["tiny", "tiny-ep"], ["bf16", "fp8"], list(bench.PARTS), [1, 4], ["eager", "moe_fusion"],
                gpu=True)
    assert result["meta"]["timing"] == "cuda_graph_replay" and result["meta"]["device"]


@pytest.mark.gpu
def test_gpu_bench_inductor_layer(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--shape", "tiny", "--m", "8", "--parts", "layer", "--variants", "eager,inductor",
            "--seconds-per-point", "0.02", "--json", str(out)]
    assert bench.main(argv) == 0
    _check_rows(json.loads(out.read_text()), ["tiny"], ["bf16"], ["layer"], [8], ["eager", "inductor"], gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["tiny", "tiny-ep"])
def test_gpu_preamble_part_times_the_preamble_aligned_as_in_the_layer(shape):
    """The bench's moe_fusion preamble also aligns the pairs for the layer's expert tiles (issue 4's
    work; the op it used to time does not): the same routing as the op, and an alignment kernel (of
    its own, or routing and aligning in one) among its launches."""
    from moe_fusion import ops
    from moe_fusion.lowering import dispatch
    from moe_fusion.tools import timing

    spec = SHAPES[shape].replace(dtype="bfloat16")
    layer = build_layer(spec, torch.device("cuda"), seed=3)
    w = canonical_weights(layer)
    x = torch.randn(4, spec.hidden_size, device="cuda").to(spec.torch_dtype)
    aligned, plain = bench.moe_fusion_fn(spec, "preamble")(x, w), ops.call_moe_preamble(spec, x, w)
    for a, b in zip(aligned, plain):
        assert torch.equal(a, b)
    names = timing.kernel_names_per_call(lambda: dispatch.moe_preamble(spec, x, w, as_in_layer=True), ())
    assert any("align" in n for n in names), names
