"""Randomized differential tests of the expert kernels (GEMM1, GEMM2, finalize) and of the whole
layer (layer.moe_layer: preamble + experts + shared expert) under TRITON_INTERPRET=1 on the CPU,
fp16 and fp8 at small shapes, against reference.py. fp16 stands in for bf16 (the interpreter's
bf16 dot is wrong). Every buffer the expert kernels write is poisoned with NaN first."""
import random

import torch

import pytest

from moe_fusion.lowering import experts, layer, preamble, reference
from moe_fusion.lowering.expert_configs import ExpertConfig, GemmTiles
from moe_fusion.spec import FP8_DTYPE, MoEWeights
from moe_cases import DEVICE, needs_kernels
from random_specs import STATS, input_kind, random_hidden, random_layer_weights, random_m, random_spec, seeds

pytestmark = [
    needs_kernels,
    pytest.mark.usefixtures("poisoned_expert_buffers"),
]
EXPERT_CASES = seeds(3000, 100)
LAYER_CASES = seeds(4000, 60)
# "large" inputs: far from 1, still inside fp16's range after two GEMMs (and the layer's fp16 output).
LARGE = {"experts": 30.0, "layer": 8.0}
# The interpreter's cost grows with token-expert pairs (one aligned tile each, at worst): the
# random M is capped to this many pairs, except in the layer cases that take the general path.
MAX_PAIRS = 24


def _capped_m(seed, top_k, allow_general=False):
    M = random_m(seed, big=80)
    if allow_general and M > preamble.FUSED_MAX_M and top_k <= 2:
        return M
    return min(M, max(1, MAX_PAIRS // top_k))

CONFIGS = [
    None,  # the heuristic the layer itself would pick
    ExpertConfig(16, GemmTiles(16, 32, programs_per_sm=1), GemmTiles(32, 32, split_k=2, programs_per_sm=1)),
    ExpertConfig(32, GemmTiles(32, 16, programs_per_sm=2), GemmTiles(16, 64, split_k=1, programs_per_sm=3)),
    ExpertConfig(16, GemmTiles(16, 16, split_k=3, programs_per_sm=1), GemmTiles(32, 32, split_k=2)),
]
FP8_CONFIGS = [
    None,
    ExpertConfig(16, GemmTiles(32, 128, programs_per_sm=1), GemmTiles(32, 128, split_k=2, programs_per_sm=1)),
    ExpertConfig(16, GemmTiles(32, 128, split_k=2, swap_ab=True), GemmTiles(32, 128, split_k=2, swap_ab=True)),
]
TOL = {"fp16": 3e-3, "fp8": 1e-4}  # fp8: the kernels make the emulation's products and scales
FP8_FLIP_TOL = 1e-2


def _to(w: MoEWeights, device) -> MoEWeights:
    return MoEWeights(**{f: (t.to(device) if isinstance(t, torch.Tensor) else t) for f, t in vars(w).items()})


def _widened(w: MoEWeights, dtype) -> MoEWeights:
    return MoEWeights(**{f: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                             and t.dtype != FP8_DTYPE else t) for f, t in vars(w).items()})


def _routing(spec, M, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(M)]
    ids = torch.stack(ids).to(torch.int32) if M else torch.zeros(0, spec.top_k, dtype=torch.int32)
    return ids, 0.1 + torch.rand(M, spec.top_k, generator=g)


def _rel_err(got, want) -> float:
    assert not got.isnan().any(), "an output element was never written"
    if want.numel() == 0:
        return 0.0
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


def _assert_fp8_close(out, want, case):
    """Within TOL["fp8"] of the emulation, except that one token may be off by up to FP8_FLIP_TOL.

    GEMM1's fp32 sums run in another order than the reference's matmul, so on a GPU an h value can
    land on the other side of an fp8 rounding boundary: one e4m3 step on one element moves that
    token's output by ~1e-4..1e-2 (H100 run, seed 60664: 3.4e-4). A wrong expert, weight or scale
    moves every token it touches by far more."""
    if _rel_err(out, want) < TOL["fp8"]:
        return
    errs = [_rel_err(o, w) for o, w in zip(out, want)]
    off = [e for e in errs if e >= TOL["fp8"]]
    assert len(off) <= 1 and max(off) < FP8_FLIP_TOL, (case, errs)


@pytest.mark.parametrize("seed", EXPERT_CASES)
def test_random_expert_block(seed):
    rng = random.Random(seed)
    spec = random_spec(seed, dtypes=("float16",), hidden=(8, 128), inter=(8, 64))
    M = _capped_m(seed, spec.top_k)
    w = random_layer_weights(spec, seed, input_kind(seed))
    x = random_hidden(spec, M, seed, input_kind(seed), large=LARGE["experts"])
    ids, weights = _routing(spec, M, seed)
    config = rng.choice(FP8_CONFIGS if spec.fp8 else CONFIGS)
    deterministic = rng.random() < 0.5
    extra = {}
    if spec.fp8 and spec.weight_on == "output" and rng.random() < 0.5:
        extra["x_fp8"], extra["x_scale"] = reference.quantize_fp8_groups(x.to(DEVICE))
    out = experts.fused_experts(spec, x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), _to(w, DEVICE),
                                config=config, deterministic=deterministic, **extra).cpu()
    assert out.dtype == torch.float32 and out.shape == (M, spec.hidden_size)
    if spec.fp8:
        # The fp8 emulation runs where the kernels do: torch on CUDA computes a scale as
        # amax * fl(1/448), on the CPU as amax / 448 (expert_tiles.py), and the kernels follow.
        want = reference.routed_experts(spec, x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), _to(w, DEVICE)).cpu()
    else:
        want = reference.routed_experts(spec.replace(dtype="float32"), x.float(), ids, weights,
                                        _widened(w, torch.float32))
    if spec.fp8:
        _assert_fp8_close(out, want, (spec, M, config, deterministic))
    else:
        assert _rel_err(out, want) < TOL["fp16"], (spec, M, config, deterministic)
    no_local = (want == 0).all(-1)  # tokens none of whose experts live on this rank
    assert (out[no_local] == 0).all()
    STATS["expert_cases"] += 1


def _expected_from_kernel_routing(spec, pre, w, shared_fp8=False):
    """float64 reference of the layer for the routing the kernels chose (the preamble tests check
    the routing itself), so a near tie that flips an expert is not mistaken for a wrong kernel.

    fp8: from the preamble's own fp8 activations. Under the interpreter its fp32 -> e4m3 cast
    loses the carry when rounding up across a power of two (a 2x error on a few values, see
    preamble_checks.assert_fp8_matches), which the preamble tests allow for; compiled kernels
    round correctly."""
    wide = torch.float32 if spec.fp8 else torch.float64  # the fp8 emulation dequantises to fp32
    w64 = _widened(w, wide)
    normed = pre.normed.to(wide)
    routed_input = normed
    if spec.fp8 and spec.weight_on == "output" and pre.x_fp8.numel():
        routed_input = reference.dequantize_fp8_groups(pre.x_fp8, pre.x_scale)
    out = reference.routed_experts(spec.replace(dtype="float32"), routed_input, pre.topk_ids,
                                   pre.topk_weights.to(wide), w64)
    if spec.has_shared_experts:
        shared = reference.shared_experts_fp8 if shared_fp8 else reference.shared_experts
        out = out + shared(spec, normed, w64).to(out.dtype)
    return out


@pytest.mark.parametrize("seed", LAYER_CASES)
def test_random_layer(seed, monkeypatch):
    rng = random.Random(seed)
    spec = random_spec(seed, dtypes=("float16",), hidden=(8, 128), inter=(8, 48), max_experts=256)
    monkeypatch.setattr(layer.options, "deterministic", rng.random() < 0.5)
    monkeypatch.setattr(layer.options, "shared_fp8", rng.random() < 0.5)  # MOE_FUSION_SHARED_FP8
    M = _capped_m(seed, spec.top_k, allow_general=True)
    kind = input_kind(seed)
    w = random_layer_weights(spec, seed, kind)
    x = random_hidden(spec, M, seed, kind, large=LARGE["layer"])
    plan = layer.plan_layer(spec, M, torch.device(DEVICE))
    got = layer.moe_layer(spec, x.to(DEVICE), _to(w, DEVICE), plan).cpu()
    assert got.dtype == x.dtype and got.shape == x.shape
    pre = preamble.fused_preamble(spec, x.to(DEVICE), _to(w, DEVICE), block_m=plan.expert_config.block_m)
    pre = type(pre)(*(t.cpu() for t in pre))
    tol = 3e-2 if spec.fp8 else 2e-3
    expected = _expected_from_kernel_routing(spec, pre, w, plan.shared_fp8)
    assert _rel_err(got, expected) < tol, (spec, M)
    # Rows routed (and, for fp8, quantised) like the reference: the reference layer itself, row by row.
    ref = reference.moe_layer(spec, x, w, shared_fp8=plan.shared_fp8)
    ref_normed, ref_ids, _ = reference.moe_preamble(spec, x, w)
    same = (pre.topk_ids == ref_ids).all(-1)
    if spec.fp8:
        same &= (pre.x_fp8.float() == reference.quantize_fp8_groups(ref_normed)[0].float()).all(-1)
    if same.any():
        err = (got[same].double() - ref[same].double()).norm(dim=-1)
        scale = ref[same].double().norm(dim=-1).clamp(min=1e-3 * ref.double().abs().max().clamp(min=1e-30))
        assert (err / scale).max() < (6e-2 if spec.fp8 else 1e-2), (spec, M)
    STATS["layer_cases"] += 1
    STATS["layer_cases_fp8_shared_expert"] += int(plan.shared_fp8)
    STATS["layer_rows"] += M
    STATS["layer_rows_routed_as_reference"] += int(same.sum())


def test_zz_summary():
    print("\nrandomized expert/layer cases:", dict(sorted(STATS.items())))
