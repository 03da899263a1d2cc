"""Randomized tests of the custom ops (torch.ops.moe_fusion.*) against reference.py: eager on
random specs (bf16 included: on the CPU the ops run the reference path), and compiled with
fullgraph=True, dynamic=True, one compile per spec serving every random M (0 and 1 included)."""
import random

import pytest
import torch

import moe_fusion  # noqa: F401  (registers the ops)
from moe_fusion.lowering import reference
from moe_fusion.ops import call_moe_layer, call_moe_preamble
from random_specs import STATS, input_kind, random_hidden, random_layer_weights, random_m, random_spec, seeds

EAGER_CASES = seeds(5000, 100)
COMPILED_SPECS = seeds(6000, 6)
MS_PER_COMPILE = 6
ALL_DTYPES = ("float16", "float32", "bfloat16")


def _same(got, want) -> bool:
    """Bitwise equal, NaN where NaN (a large fp16 input may overflow: the reference's answer too)."""
    if got.dtype.itemsize == 1:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return bool(((got == want) | (got.isnan() & want.isnan() if got.is_floating_point() else False)).all())


def _check_preamble_outputs(spec, x, w, outputs):
    normed, x_fp8, x_scale, ids, weights = outputs
    ref_normed, ref_ids, ref_weights = reference.moe_preamble(spec, x, w)
    assert _same(normed, ref_normed) and (normed.numel() == 0 or normed.data_ptr() != x.data_ptr())
    assert ids.dtype == torch.int32 and torch.equal(ids, ref_ids)
    assert _same(weights, ref_weights.float())
    if spec.fp8:
        q, s = reference.quantize_fp8_groups(ref_normed)
        assert _same(x_fp8, q) and _same(x_scale, s)
    else:
        assert x_fp8.numel() == 0 and x_scale.numel() == 0


@pytest.mark.parametrize("seed", EAGER_CASES)
def test_random_eager_ops(seed):
    spec = random_spec(seed, dtypes=ALL_DTYPES, hidden=(8, 96), inter=(8, 32))
    kind = input_kind(seed)
    M = random_m(seed, big=70)
    w = random_layer_weights(spec, seed, kind)
    x = random_hidden(spec, M, seed, kind, large=8.0)
    out = call_moe_layer(spec, x, w)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert _same(out, reference.moe_layer(spec, x, w))
    _check_preamble_outputs(spec, x, w, call_moe_preamble(spec, x, w))
    STATS["eager_op_cases"] += 1


@pytest.mark.parametrize("seed", COMPILED_SPECS)
def test_random_compiled_ops_one_graph_for_every_m(seed):
    spec = random_spec(seed, dtypes=ALL_DTYPES, hidden=(8, 96), inter=(8, 32))
    w = random_layer_weights(spec, seed, input_kind(seed))

    def moe(x):
        out = call_moe_layer(spec, x, w)
        return out, call_moe_preamble(spec, x, w)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    rng = random.Random(seed)
    ms = [rng.choice([2, 3, 5]), 0, 1] + [random_m(seed * 10 + i, big=70) for i in range(MS_PER_COMPILE - 3)]
    for i, M in enumerate(ms):
        x = random_hidden(spec, M, seed + i, input_kind(seed + i), large=8.0)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        out, pre = compiled(x)
        eager_out, eager_pre = moe(x)
        assert _same(out, eager_out), (spec, M)
        assert all(_same(got, want) for got, want in zip(pre, eager_pre)), (spec, M)
        _check_preamble_outputs(spec, x, w, pre)
        assert _same(out, reference.moe_layer(spec, x, w))
        STATS["compiled_op_cases"] += 1
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_zz_summary():
    print("\nrandomized op cases:", dict(sorted(STATS.items())))


def test_fp8_preamble_op_outputs_are_contiguous_when_h_is_not_a_multiple_of_128():
    """The reference path quantises into 128-padded rows; the op must still return what its fake
    promises (a compiled graph asserts the strides)."""
    spec = random_spec(6003).replace(hidden_size=200, quant="fp8_block", dtype="float16")
    w = random_layer_weights(spec, 0)
    x = random_hidden(spec, 3, 0)
    x_fp8 = call_moe_preamble(spec, x, w)[1]
    assert x_fp8.is_contiguous()
    compiled = torch.compile(lambda t: call_moe_preamble(spec, t, w), fullgraph=True, dynamic=True)
    assert _same(compiled(x)[1], x_fp8)
