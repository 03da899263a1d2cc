"""The reference's own building blocks against independent, loop-by-loop restatements."""
import pytest
import torch

from moe_fusion.lowering import reference
from moe_fusion.spec import FP8_MAX

from moe_cases import dsv3_like, random_weights


def _grouped_topk_by_loops(spec, scores, bias):
    """DeepSeek-V3 routing, token by token with Python lists."""
    ids = []
    for row, choice in zip(scores.tolist(), (scores + bias).tolist()):
        per = spec.experts_per_group
        groups = [choice[g * per:(g + 1) * per] for g in range(spec.n_group)]
        group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        kept = sorted(range(spec.n_group), key=lambda g: -group_score[g])[: spec.topk_group]
        candidates = [e for g in kept for e in range(g * per, (g + 1) * per)]
        ids.append(sorted(sorted(candidates, key=lambda e: -choice[e])[: spec.top_k]))
    return torch.tensor(ids)


def test_grouped_topk_matches_loops():
    spec = dsv3_like(num_experts=32, n_group=8, topk_group=3, top_k=6)
    logits = torch.randn(40, 32)
    bias = 0.1 * torch.randn(32)
    ids, weights = reference.select_experts(spec, logits, bias)
    assert torch.equal(ids.long().sort(-1).values, _grouped_topk_by_loops(spec, logits.sigmoid(), bias))
    chosen = logits.sigmoid().gather(1, ids.long())
    torch.testing.assert_close(weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))


def test_max_group_score_differs_from_top2_sum():
    spec = dsv3_like(group_score="max", n_group=4, topk_group=1, top_k=2)
    # Group 0 has one high expert, group 1 has two medium ones: max keeps group 0, top2-sum group 1.
    logits = torch.full((1, 16), -6.0)
    logits[0, 0], logits[0, 4], logits[0, 5] = 3.0, 1.5, 1.5
    bias = torch.zeros(16)
    ids_max, _ = reference.select_experts(spec, logits, bias)
    ids_sum, _ = reference.select_experts(spec.replace(group_score="top2_sum"), logits, bias)
    assert 0 in ids_max.tolist()[0] and set(ids_sum.tolist()[0]) == {4, 5}


def test_fp8_group_quantisation_error_is_within_half_a_step():
    x = torch.randn(7, 300) * 3
    q, scale = reference.quantize_fp8_groups(x)
    assert scale.shape == (7, 3) and q.shape == x.shape
    back = reference.dequantize_fp8_groups(q, scale)
    # e4m3 has 3 mantissa bits: relative rounding error at most 2^-4 of the value (normal range).
    big = x.abs() > scale.repeat_interleave(128, -1)[:, :300] * 2 ** -6
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + 1e-12)[big].all()
    amax = x.view(7, -1).abs().amax()
    assert float(q.float().abs().max()) == FP8_MAX or float(amax) == 0


def test_fp8_block_quantisation_round_trip():
    w = torch.randn(3, 200, 130)
    q, scale = reference.quantize_fp8_blocks(w)
    assert scale.shape == (3, 2, 2)
    back = reference.dequantize_fp8_blocks(q, scale)
    assert float((back - w).norm() / w.norm()) < 0.05


def _pairs_by_loops(topk_ids, expert_map, L):
    flat = topk_ids.flatten().tolist()
    per_expert = {e: [] for e in range(L)}
    for p, e in enumerate(flat):
        local = e if expert_map is None else int(expert_map[e])
        if local >= 0:
            per_expert[local].append(p)
    return per_expert


@pytest.mark.parametrize("M,k,E,L,block_m", [(1, 1, 4, 4, 16), (5, 3, 8, 8, 4), (33, 8, 16, 4, 16), (64, 2, 3, 3, 64)])
def test_align_pairs(M, k, E, L, block_m):
    topk_ids = torch.stack([torch.randperm(E)[:k] for _ in range(M)]).to(torch.int32)
    expert_map = None
    if L != E:
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[torch.randperm(E)[:L]] = torch.arange(L, dtype=torch.int32)
    sorted_ids, tile_expert, num_tiles = reference.align_pairs(topk_ids, expert_map, L, block_m)
    expected = _pairs_by_loops(topk_ids, expert_map, L)
    max_tiles = reference.max_aligned_tiles(M * k, L, block_m)
    assert sorted_ids.shape == (max_tiles * block_m,) and tile_expert.shape == (max_tiles,)
    n = int(num_tiles)
    assert n == sum(-(-len(v) // block_m) for v in expected.values())
    assert (tile_expert[n:] == -1).all() and (sorted_ids[n * block_m:] == M * k).all()
    got = {e: [] for e in range(L)}
    for t in range(n):
        tile = sorted_ids[t * block_m:(t + 1) * block_m].tolist()
        got[int(tile_expert[t])] += [p for p in tile if p != M * k]
    assert got == expected


def test_expert_parallel_ranks_sum_to_the_full_layer():
    full = dsv3_like(shared_intermediate_size=0)
    w = random_weights(full, seed=5)
    x = torch.randn(9, full.hidden_size)
    expected = reference.moe_layer(full, x, w)
    ranks = 4
    local = full.replace(num_local_experts=full.num_experts // ranks)
    total = torch.zeros_like(expected)
    for r in range(ranks):
        owned = torch.arange(r * local.num_local_experts, (r + 1) * local.num_local_experts)
        expert_map = torch.full((full.num_experts,), -1, dtype=torch.int32)
        expert_map[owned] = torch.arange(local.num_local_experts, dtype=torch.int32)
        w_r = random_weights(local)
        w_r.norm_weight, w_r.router_weight, w_r.correction_bias = w.norm_weight, w.router_weight, w.correction_bias
        w_r.w_gate, w_r.w_up, w_r.w_down = w.w_gate[owned], w.w_up[owned], w.w_down[owned]
        w_r.expert_map = expert_map
        total += reference.moe_layer(local, x, w_r)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_routed_experts_by_pairs():
    """The dense-per-expert reference equals a pair-by-pair loop, fp8 included."""
    for spec in (dsv3_like(shared_intermediate_size=0), dsv3_like(quant="fp8_block", hidden_size=256, intermediate_size=128)):
        w = random_weights(spec, seed=6)
        x = torch.randn(5, spec.hidden_size)
        normed, ids, weights = reference.moe_preamble(spec, x, w)
        got = reference.routed_experts(spec, normed, ids, weights, w)
        expected = torch.zeros_like(got)
        for t in range(5):
            for j in range(spec.top_k):
                e = int(ids[t, j])
                if spec.fp8:
                    wg, wu, wd = (reference.dequantize_fp8_blocks(q[e], s[e]) for q, s in
                                  ((w.w_gate, w.w_gate_scale), (w.w_up, w.w_up_scale), (w.w_down, w.w_down_scale)))
                    xq = reference.fp8_round_trip(normed[t:t + 1])
                    h = torch.nn.functional.silu(xq @ wg.T) * (xq @ wu.T)
                    y = reference.fp8_round_trip(h) @ wd.T
                else:
                    y = reference.gated_mlp(normed[t:t + 1], w.w_gate[e], w.w_up[e], w.w_down[e])
                expected[t] += weights[t, j] * y[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_inf_in_an_unselected_expert_does_not_poison_the_output():
    spec = dsv3_like(shared_intermediate_size=0)
    w = random_weights(spec)
    x = torch.randn(3, spec.hidden_size)
    normed, ids, weights = reference.moe_preamble(spec, x, w)
    unused = sorted(set(range(16)) - set(ids.flatten().tolist()))[0]
    w.w_down = w.w_down.clone()
    w.w_down[unused] = float("inf")
    assert torch.isfinite(reference.routed_experts(spec, normed, ids, weights, w)).all()
