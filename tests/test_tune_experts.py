"""tune_experts.random_routing: the tuner's routings pick experts as the model does, so an expert-parallel
rank's hits spread as the bench's (benchmarks/routing_seeds.local_hit_distribution)."""
import collections

import pytest
import torch

from moe_fusion.lowering import tune_experts


def _hits(shape, m, draws, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = collections.Counter()
    for _ in range(draws):
        ids, _ = tune_experts.random_routing(shape, m, device="cpu", generator=g)
        counts[int(ids[ids < shape.local_experts].unique().numel())] += 1
    return {h: n / draws for h, n in counts.items()}


def test_dsv3_ep8_routings_hit_the_rank_as_grouped_routing_does():
    """A token keeps 4 of 8 groups, and the rank's 32 experts are one group: about half the one-token routings
    hit none and a quarter two (the bench's shares: 50% / 14% / 24%); uniform picks would give 34% / 40% / 20%."""
    shares = _hits(tune_experts.SHAPES["dsv3-ep8"], 1, 3000)
    assert 0.46 < shares[0] < 0.55 and 0.10 < shares[1] < 0.18 and 0.20 < shares[2] < 0.29
    four = _hits(tune_experts.SHAPES["dsv3-ep8"], 4, 1500)
    assert 3.2 < sum(h * p for h, p in four.items()) < 3.7  # the bench's routers: 3.48-3.51


@pytest.mark.parametrize("name", ["dsv3", "qwen3-30b-a3b", "mixtral"])
def test_each_token_gets_distinct_experts_within_its_groups_and_weights_summing_to_one(name):
    shape = tune_experts.SHAPES[name]
    g = torch.Generator().manual_seed(1)
    ids, w = tune_experts.random_routing(shape, 64, device="cpu", generator=g)
    assert ids.shape == w.shape == (64, shape.top_k) and ids.dtype == torch.int32
    assert all(row.unique().numel() == shape.top_k for row in ids)
    groups = ids.long() // (shape.experts // shape.n_group)
    assert all(row.unique().numel() <= shape.topk_group for row in groups)
    assert (w > 0).all() and torch.allclose(w.sum(-1), torch.ones(64))
