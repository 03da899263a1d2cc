"""fused_preamble (all kernels together, decode and general paths) against reference.py:
small shapes under TRITON_INTERPRET=1 on the CPU, the benchmark's real shapes in bf16 on a GPU."""

import torch
import triton

import pytest

from moe_cases import DEVICE, dsv3_like
from moe_fusion.lowering import preamble, route_align_kernel, topk_kernel
from moe_fusion.spec import MoESpec
from preamble_checks import check_preamble, one_launch_plan, poisoned_empty, preamble_weights, real_shapes


SMALL = {
    "dsv3_fp32_fp8": dsv3_like(hidden_size=256, quant="fp8_block"),
    "groups_not_pow2_fp16_fp8": dsv3_like(hidden_size=200, num_experts=24, n_group=3, topk_group=2, top_k=3,
                                          group_score="max", router_fp32=False, dtype="float16", quant="fp8_block"),
    "one_group_top1_no_norm": MoESpec(hidden_size=64, num_experts=10, top_k=1, intermediate_size=8, dtype="float16"),
    "softmax_after_topk": MoESpec(hidden_size=96, num_experts=12, top_k=3, intermediate_size=8, rms_norm=True,
                                  scoring="softmax", score_before_topk=False, renormalize=True, dtype="float32"),
    "expert_parallel": dsv3_like(num_local_experts=4),
    # 256 experts: one routing program per row, so M = 7 routes in 7 programs of the one launch.
    "dsv3_experts_fp16": dsv3_like(hidden_size=128, num_experts=256, n_group=8, topk_group=4, top_k=8,
                                   dtype="float16", num_local_experts=32),
}


def _run(spec, M, block_m, device=DEVICE, seed=0, plan=None):
    w = preamble_weights(spec, device, seed)
    x = torch.randn(M, spec.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).to(spec.torch_dtype)
    x = x.to(device)
    with poisoned_empty():
        out = preamble.fused_preamble(spec, x, w, block_m, plan=plan)
    return spec, x, w, out


PATHS = {"one_launch": dict(fused=True), "general": dict(fused=False),
         "route_align": dict(fused=False, route_align=True)}


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("M,block_m", [(1, 16), (7, 4)])
@pytest.mark.parametrize("path", list(PATHS))
def test_one_launch_and_general_paths_match_reference(name, M, block_m, path):
    """route_align: routing and alignment in one program (planned at one token), here also over
    7 rows (its row loop) and every spec's routing (groups, softmax after top-k, expert parallel)."""
    spec = SMALL[name]
    spec, x, w, out = _run(spec, M, block_m, plan=one_launch_plan(spec, M, DEVICE, **PATHS[path]))
    check_preamble(spec, x, w, out, block_m)


@pytest.mark.parametrize("name,routed_with_alignment", [("dsv3_experts_fp16", (1,)), ("one_group_top1_no_norm", (1, 2, 4))])
def test_few_tokens_route_and_align_in_one_program(name, routed_with_alignment):
    """The plan: one program while tokens x padded experts <= route_align_kernel.ROUTE_ALIGN_MAX_TILE
    (256 experts: one token; 10 experts, padded to 16: up to 16 tokens)."""
    spec = SMALL[name]
    for M in (1, 2, 4):
        plan = preamble.plan_preamble(spec, M, spec.torch_dtype, spec.torch_dtype, torch.device(DEVICE))
        assert (plan.align == "with_routing") == (M in routed_with_alignment), (M, plan.align)
    check_preamble(*_run(spec, routed_with_alignment[-1], 4), block_m=4)


@pytest.mark.parametrize("name", ["dsv3_experts_fp16", "groups_not_pow2_fp16_fp8"])
def test_route_align_routes_several_rows_as_one_tile(name, monkeypatch):
    """With a tile of 4 rows the planner gives 3 tokens to the one program, which routes them as one
    tile (grouped top-k of every row at once) and aligns from the ids in registers."""
    spec = SMALL[name]
    monkeypatch.setattr(route_align_kernel, "ROUTE_ALIGN_MAX_TILE", 4 * topk_kernel.padded_experts(spec))
    assert topk_kernel.route_meta(spec, spec.torch_dtype, 3, route_align_kernel.ROUTE_ALIGN_MAX_TILE)["ROWS"] == 4
    plan = preamble.plan_preamble(spec, 3, spec.torch_dtype, spec.torch_dtype, torch.device(DEVICE))
    assert plan.align == "with_routing"
    check_preamble(*_run(spec, 3, 4, plan=plan), block_m=4)


@pytest.mark.parametrize("name", ["groups_not_pow2_fp16_fp8", "dsv3_fp32_fp8"])
@pytest.mark.parametrize("block_e,block_k", [(32, 512), (16, 128)])
def test_narrow_router_tiles(name, block_e, block_k, monkeypatch):
    """The router's tile for up to 16 rows: one K chunk per program in one tile (K past the hidden
    size masked) or split over K with a masked tail, experts in blocks narrower than E."""
    monkeypatch.setattr(preamble, "ROUTER_NARROW_BLOCK_E", block_e)
    monkeypatch.setattr(preamble, "ROUTER_NARROW_BLOCK_K", block_k)
    spec = SMALL[name]
    plan = preamble.plan_preamble(spec, 3, spec.torch_dtype, spec.torch_dtype, torch.device(DEVICE))
    assert plan.router.block_e == min(block_e, triton.next_power_of_2(spec.num_experts))
    check_preamble(*_run(spec, 3, 4, plan=plan), block_m=4)


def test_general_path_matches_reference():
    spec = SMALL["groups_not_pow2_fp16_fp8"]
    M = max(preamble.FUSED_MAX_M, route_align_kernel.ROUTE_ALIGN_MAX_TILE // topk_kernel.padded_experts(spec)) + 3
    plan = preamble.plan_preamble(spec, M, spec.torch_dtype, spec.torch_dtype, torch.device(DEVICE))
    assert not plan.fused and plan.route == "kernel" and plan.align == "kernel"
    check_preamble(*_run(spec, M, 8), block_m=8)


def test_reference_fallbacks_of_the_general_path():
    spec = SMALL["expert_parallel"]
    M = 5
    plan = preamble.plan_preamble(spec, M, spec.torch_dtype, spec.torch_dtype, torch.device(DEVICE))
    plan.fused, plan.route, plan.align = False, "reference", "reference"
    check_preamble(*_run(spec, M, 2, plan=plan), block_m=2)


@pytest.mark.parametrize("M", [1, 5])
def test_deterministic_plan_has_one_program_per_logit(M):
    """Deterministic mode: no split-K (each logit is one atomic add into zero), same routing."""
    spec = SMALL["dsv3_fp32_fp8"]
    plan = preamble.plan_preamble(spec, M, spec.torch_dtype, spec.torch_dtype, torch.device(DEVICE), deterministic=True)
    assert plan.router.grid[0] == 1 and plan.router.k_per_program >= spec.hidden_size
    w = preamble_weights(spec, DEVICE)
    x = torch.randn(M, spec.hidden_size).to(spec.torch_dtype).to(DEVICE)
    with poisoned_empty():
        out = preamble.fused_preamble(spec, x, w, 4, deterministic=True)
    check_preamble(spec, x, w, out, 4)


def test_no_tokens():
    spec = SMALL["dsv3_fp32_fp8"]
    _, _, _, out = _run(spec, 0, 16)
    assert out.topk_ids.shape == (0, spec.top_k) and out.num_tiles.tolist() == [0]
    assert out.sorted_pair_ids.numel() == 0 and out.x_scale.shape == (0, 2)


def test_unsupported_inputs_raise_clearly():
    spec = SMALL["expert_parallel"]
    w = preamble_weights(spec, DEVICE)
    with pytest.raises(preamble.Unsupported, match="expert_map"):
        w.expert_map = None
        preamble.fused_preamble(spec, torch.randn(2, spec.hidden_size, device=DEVICE), w, 16)
    with pytest.raises(preamble.Unsupported, match="dtype"):
        preamble.fused_preamble(spec, torch.randn(2, spec.hidden_size, dtype=torch.float64, device=DEVICE),
                                preamble_weights(spec, DEVICE), 16)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(real_shapes()))
@pytest.mark.parametrize("M", [1, 4, 16, 33, 64, 65, 300, 1500])
def test_real_shapes_on_gpu(name, M):
    spec = real_shapes()[name]
    check_preamble(*_run(spec, M, 16, device="cuda"), block_m=16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_real_dsv3_other_dtypes_on_gpu(dtype):
    spec = real_shapes()["dsv3"].replace(dtype=dtype)
    check_preamble(*_run(spec, 8, 16, device="cuda"), block_m=16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dsv3", "dsv3-ep8"])
def test_captured_in_a_cuda_graph(name):
    spec = real_shapes()[name]
    w = preamble_weights(spec, "cuda")
    x = torch.randn(4, spec.hidden_size, device="cuda", dtype=spec.torch_dtype)
    preamble.fused_preamble(spec, x, w, 16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = preamble.fused_preamble(spec, x, w, 16)
    for seed in range(3):  # replays on new inputs, copied into the captured buffer
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        for t in out:
            if t.dtype.is_floating_point and t.dtype != torch.float8_e4m3fn:
                t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_preamble(spec, x, w, out, 16)


def test_without_alignment_the_rest_is_unchanged():
    spec = SMALL["expert_parallel"]
    w = preamble_weights(spec, DEVICE)
    x = torch.randn(3, spec.hidden_size, device=DEVICE)
    full = preamble.fused_preamble(spec, x, w, 4)
    w.expert_map = None  # not needed without alignment
    bare = preamble.fused_preamble(spec, x, w, 4, with_alignment=False)
    assert all(t.numel() == 0 for t in bare[-3:])
    for a, b in zip(full[:5], bare[:5]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_moe_preamble_op_uses_the_kernels_on_cuda():
    from moe_fusion.lowering import dispatch, reference
    from moe_fusion.ops import call_moe_preamble

    spec = real_shapes()["dsv3"]
    w = preamble_weights(spec, "cuda")
    x = torch.randn(5, spec.hidden_size, device="cuda", dtype=spec.torch_dtype)
    outputs = call_moe_preamble(spec, x, w)
    assert ("moe_preamble", spec.to_json()) not in dispatch.fallback_reasons
    aligned = reference.align_pairs(outputs[3], None, spec.num_local_experts, 16)
    check_preamble(spec, x, w, preamble.PreambleOut(*outputs, *aligned), 16)
