import pytest

from moe_fusion.spec import MoESpec, SpecError

from moe_cases import dsv3_like


def test_json_round_trip_keeps_every_field():
    spec = dsv3_like(num_local_experts=4, quant="fp8_block", shared_gate=True, group_score="max")
    assert MoESpec.from_json(spec.to_json()) == spec


def test_local_experts_default_to_all():
    assert dsv3_like().num_local_experts == 16 and not dsv3_like().expert_parallel


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(num_experts=15), "not divisible by n_group"),
        (dict(top_k=9), "exceeds the 8 experts"),
        (dict(topk_group=5), "exceeds n_group"),
        (dict(scoring="tanh"), "unknown scoring"),
        (dict(group_score="mean"), "unknown group_score"),
        (dict(num_experts=8, n_group=8, topk_group=4, top_k=2), "top2_sum needs >= 2 experts per group"),
        (dict(num_local_experts=17), "num_local_experts"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(quant="int4"), "unknown quant"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(score_before_topk=False), "correction bias only exists"),
        (dict(shared_intermediate_size=0, shared_gate=True), "shared_gate without shared experts"),
        (dict(renormalize_eps=-1.0), "renormalize_eps"),
    ],
)
def test_impossible_specs_are_rejected(changes, message):
    with pytest.raises(SpecError, match=message):
        dsv3_like(**changes)
