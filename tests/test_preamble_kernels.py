"""Each preamble kernel alone against reference.py: under TRITON_INTERPRET=1 on the CPU (small
shapes, fp32/fp16: bf16 dot and casts are wrong in the interpreter), compiled on a GPU."""

import torch

import pytest

from moe_fusion.lowering import align_kernel, reference, topk_kernel
from moe_fusion.lowering.norm_quant_kernel import N_COUNTERS, norm_quant
from moe_fusion.spec import MoESpec
from moe_cases import DEVICE
from preamble_checks import (
    assert_fp8_matches, assert_normed_close, clean_rows, force_pick_mode, poisoned_empty,
)


@pytest.mark.parametrize("M,H,dtype", [(1, 64, torch.float32), (3, 200, torch.float16), (2, 8300, torch.float16)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_norm_quant(M, H, dtype, with_norm):
    x = (3 * torch.randn(M, H)).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(H)).to(dtype).to(DEVICE) if with_norm else None
    workspace = torch.full((M, 37), 5.0, device=DEVICE)
    counters = torch.full((N_COUNTERS,), 9, dtype=torch.int32, device=DEVICE)
    with poisoned_empty():
        normed, q, scale = norm_quant(x, weight, 1e-6, True, workspace, counters)
    assert_normed_close(normed, reference.rms_norm(x, weight, 1e-6) if with_norm else x)
    assert_fp8_matches(normed, q, scale)
    assert (workspace == 0).all() and (counters == 0).all()


def test_norm_without_quant_returns_empty_fp8():
    x = torch.randn(2, 64, device=DEVICE)
    normed, q, scale = norm_quant(x, None, 1e-6, False)
    assert torch.equal(normed, x) and normed.data_ptr() != x.data_ptr()
    assert q.numel() == 0 and scale.numel() == 0


ROUTING_SPECS = {
    "dsv3_like": dict(num_experts=16, top_k=4, scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2,
                      renormalize=True, renormalize_eps=1e-20, routed_scaling_factor=2.5, router_fp32=True),
    "groups_not_pow2_max": dict(num_experts=24, top_k=3, scoring="sigmoid", n_group=3, topk_group=2,
                                group_score="max", renormalize=True),
    "one_group_top1_softmax": dict(num_experts=10, top_k=1, scoring="softmax"),
    "softmax_after_topk": dict(num_experts=12, top_k=3, scoring="softmax", score_before_topk=False, renormalize=True),
    "raw_logits": dict(num_experts=7, top_k=2, scoring="none"),
    "many_groups": dict(num_experts=32, top_k=8, scoring="sigmoid", n_group=8, topk_group=4,
                        renormalize=True, routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("name", list(ROUTING_SPECS))
@pytest.mark.parametrize("M", [1, 19])
@pytest.mark.parametrize("sort_picks", [False, True], ids=["picks-one-by-one", "picks-by-sort"])
def test_select_experts(name, M, sort_picks, monkeypatch):
    force_pick_mode(monkeypatch, sort_picks)
    spec = MoESpec(hidden_size=8, intermediate_size=8, **ROUTING_SPECS[name])
    logits = torch.randn(M, spec.num_experts, device=DEVICE)
    bias = 0.1 * torch.randn(spec.num_experts, device=DEVICE) if spec.correction_bias else None
    with poisoned_empty():
        ids, weights = topk_kernel.select_experts(spec, logits, bias, torch.float32)
    ref_ids, ref_weights = reference.select_experts(spec, logits, bias)
    clean = clean_rows(spec, logits.double(), None if bias is None else bias.double())
    assert clean.any()
    assert torch.equal(ids[clean], ref_ids[clean])
    torch.testing.assert_close(weights[clean], ref_weights[clean], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sort_picks", [False, True], ids=["picks-one-by-one", "picks-by-sort"])
def test_group_top2_sum_counts_a_tied_maximum_twice(sort_picks, monkeypatch):
    force_pick_mode(monkeypatch, sort_picks)
    # Group 0's top two are equal (3 + 3 = 6 beats group 1's 3.5 + 2); dropping every copy of the
    # maximum would score group 0 as 3 + 0 and pick group 1 instead.
    spec = MoESpec(hidden_size=8, intermediate_size=8, num_experts=8, top_k=2, scoring="none", n_group=2,
                   topk_group=1)
    logits = torch.tensor([[3.0, 3.0, 0.0, -1.0, 3.5, 2.0, 0.0, 0.0]], device=DEVICE)
    ids, weights = topk_kernel.select_experts(spec, logits, None, torch.float32)
    assert ids.tolist() == [[0, 1]]  # equal values: the lower index first
    assert weights.tolist() == [[3.0, 3.0]]


def test_select_experts_rounds_model_dtype_logits():
    spec = MoESpec(hidden_size=8, intermediate_size=8, num_experts=16, top_k=2, scoring="softmax", renormalize=True)
    logits = torch.randn(5, 16, device=DEVICE)
    ids, weights = topk_kernel.select_experts(spec, logits, None, torch.float16)
    rounded = logits.half().float()
    ref_ids, ref_weights = reference.select_experts(spec, rounded)
    clean = clean_rows(spec, rounded.double(), None)
    assert torch.equal(ids[clean], ref_ids[clean])
    torch.testing.assert_close(weights[clean], ref_weights[clean], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M,k,E,L,block_m", [
    (1, 1, 4, 4, 16), (5, 3, 10, 10, 4), (37, 8, 256, 32, 16), (70, 4, 12, 12, 3), (9, 2, 8, 3, 1), (300, 2, 6, 6, 64),
    (200, 8, 256, 256, 16),  # 1600 pairs
])
@pytest.mark.parametrize("parallel", [False, True], ids=["one-program", "many-programs"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_align_pairs(M, k, E, L, block_m, parallel, ids_dtype):
    topk_ids, expert_map = _random_ids_and_map(M, k, E, L, ids_dtype)
    _assert_aligned_as_reference(topk_ids, expert_map, L, block_m, parallel)


def _assert_aligned_as_reference(topk_ids, expert_map, L, block_m, parallel):
    """The kernel's alignment, into NaN-poisoned buffers, equals reference.align_pairs' exactly."""
    with poisoned_empty():
        got = align_kernel.align_pairs(topk_ids, expert_map, L, block_m, parallel=parallel)
    for g, w in zip(got, reference.align_pairs(topk_ids, expert_map, L, block_m)):
        assert torch.equal(g, w)


def _random_ids_and_map(M, k, E, L, ids_dtype=torch.int32):
    """Top-k ids of M tokens over E experts, and an expert map to L local ones where L < E."""
    topk_ids = torch.stack([torch.randperm(E)[:k] for _ in range(M)]).to(ids_dtype).to(DEVICE)
    expert_map = None
    if L != E:
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[torch.randperm(E)[:L]] = torch.arange(L, dtype=torch.int32)
        expert_map = expert_map.to(DEVICE)
    return topk_ids, expert_map


@pytest.mark.parametrize("M,k,E,L,block_m", [(1, 8, 256, 256, 16), (3, 8, 256, 32, 16), (5, 6, 64, 64, 8),
                                             (4, 8, 20, 20, 4), (10, 3, 16, 5, 2)])
@pytest.mark.parametrize("pair_list_max", [32, 0], ids=["pair-list", "selection"])
def test_align_pairs_one_program_from_pair_list_or_selection(M, k, E, L, block_m, pair_list_max, monkeypatch):
    """Up to PAIR_LIST_MAX_PAIRS pairs the one program compares pairs with pairs; both ways give
    the reference's alignment, including experts with several pairs and pairs of no local expert."""
    monkeypatch.setattr(align_kernel, "PAIR_LIST_MAX_PAIRS", pair_list_max)
    topk_ids, expert_map = _random_ids_and_map(M, k, E, L)
    _assert_aligned_as_reference(topk_ids, expert_map, L, block_m, parallel=False)


@pytest.mark.parametrize("pairs_per_chunk", [512, 4096], ids=["four-chunks", "one-chunk"])
def test_align_pairs_many_programs_in_chunks_or_one(pairs_per_chunk, monkeypatch):
    """The many-program kernel's two passes over the ids: in chunks of PARALLEL_PAIRS, or, where all
    pairs fit one, from one load (the chunks' running ranks, ``before``, only in the first)."""
    monkeypatch.setattr(align_kernel, "PARALLEL_PAIRS", pairs_per_chunk)
    topk_ids, expert_map = _random_ids_and_map(200, 8, 64, 48)
    _assert_aligned_as_reference(topk_ids, expert_map, 48, 8, parallel=True)


@pytest.mark.parametrize("tokens_above_kernel_limit", [False, True])
def test_align_pairs_fastest_takes_any_ids_and_falls_back_to_torch_above_its_limit(tokens_above_kernel_limit,
                                                                                   monkeypatch):
    """The alignment the expert block makes for itself (no preamble): int64 ids in a non-contiguous
    view go to the kernel as contiguous int64 rows (no cast launch); above ALIGN_KERNEL_MAX_M tokens
    torch's sort aligns."""
    monkeypatch.setattr(align_kernel, "ALIGN_KERNEL_MAX_M", 4 if tokens_above_kernel_limit else 4096)
    launched = []
    real = align_kernel.align_pairs
    monkeypatch.setattr(align_kernel, "align_pairs", lambda *a, **k: launched.append(a) or real(*a, **k))
    wide = torch.stack([torch.randperm(12)[:6] for _ in range(7)]).to(DEVICE)  # int64
    topk_ids = wide[:, ::2]  # [7, 3], row stride 6
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, 4, -1, 5, -1, 6], dtype=torch.int32, device=DEVICE)
    with poisoned_empty():
        got = align_kernel.align_pairs_fastest(topk_ids, expert_map, 7, 4)
    assert len(launched) == (0 if tokens_above_kernel_limit else 1)
    assert all(ids.dtype == torch.int64 and ids.is_contiguous() for ids, *_ in launched)
    for g, w in zip(got, reference.align_pairs(topk_ids, expert_map, 7, 4)):
        assert torch.equal(g, w)
