"""The expert kernels (GEMM1, GEMM2, finalize, fp8 weight quantisation) under TRITON_INTERPRET=1
against reference.routed_experts, on small odd shapes.

fp16 stands in for bf16 here (the interpreter's bf16 dot is wrong); bf16 numerics are checked on
the GPU by benchmarks/gpu_experts.py. Every buffer the kernels write is poisoned with NaN first.
"""

import pytest  # noqa: E402
import torch  # noqa: E402

from moe_fusion.lowering import expert_configs, experts, reference  # noqa: E402
from moe_fusion.lowering.expert_configs import ExpertConfig, GemmTiles, ProblemKey  # noqa: E402
from moe_fusion.spec import FP8_DTYPE, MoESpec, MoEWeights  # noqa: E402

from moe_cases import DEVICE, needs_kernels, random_weights  # noqa: E402

# The interpreter on the CPU; compiled kernels where there is a GPU (same checks; the fp8
# arithmetic follows torch on each device).
pytestmark = [
    needs_kernels,
    pytest.mark.usefixtures("poisoned_expert_buffers"),
]

# Small tiles so that the loops over items, K blocks and splits all run more than once.
SMALL = ExpertConfig(16, GemmTiles(16, 32, programs_per_sm=1), GemmTiles(32, 32, split_k=2, programs_per_sm=1))
# fp8: the kernels make the emulation's fp8 products and scales; only the fp32 summation order
# differs. On the GPU, SiLU's fast exp can flip the bf16/fp16 rounding of an h element and so its
# fp8 re-quantisation by one step: up to ~6e-4 seen at real shapes (benchmarks/results).
FP8_TOL = 1e-4 if DEVICE == "cpu" else 1e-3
SMALL_FP8 = ExpertConfig(16, GemmTiles(32, 128, programs_per_sm=1), GemmTiles(32, 128, split_k=2, programs_per_sm=1))


def _spec(**changes) -> MoESpec:
    base = dict(hidden_size=72, num_experts=6, top_k=2, intermediate_size=40, dtype="float16")
    base.update(changes)
    return MoESpec(**base)


def _routing(spec: MoESpec, M: int, experts_allowed=None):
    """Distinct random experts per token (from experts_allowed if given), random positive weights."""
    pool = torch.tensor(experts_allowed) if experts_allowed is not None else torch.arange(spec.num_experts)
    ids = torch.stack([pool[torch.randperm(len(pool))[: spec.top_k]] for _ in range(M)]).to(torch.int32)
    return ids.to(DEVICE), (0.1 + torch.rand(M, spec.top_k)).to(DEVICE)


def _x(*shape):
    return torch.randn(*shape).half().to(DEVICE)


def _fp32_weights(w: MoEWeights) -> MoEWeights:
    return MoEWeights(**{f: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and
                             t.dtype != FP8_DTYPE else t) for f, t in vars(w).items()})


def _reference(spec, x, ids, weights, w):
    """fp32 reference for fp16 specs (the kernels keep gate/up in fp32); the exact fp8 emulation for fp8."""
    if spec.fp8:
        return reference.routed_experts(spec, x, ids, weights, w)
    return reference.routed_experts(spec.replace(dtype="float32"), x.float(), ids, weights, _fp32_weights(w))


def _rel_err(out, ref):
    assert not out.isnan().any(), "an output element was never written"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("M", [1, 5, 19])
def test_fp16_matches_reference(M, deterministic):
    spec = _spec()
    w = random_weights(spec, seed=M, device=DEVICE)
    x = _x(M, spec.hidden_size)
    ids, weights = _routing(spec, M)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=deterministic)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < 3e-3


def test_empty_experts_and_all_tokens_on_one_expert():
    spec = _spec(num_experts=8, top_k=1)
    w = random_weights(spec, device=DEVICE)
    M = 23  # more than one token tile on the one expert
    x = _x(M, spec.hidden_size)
    ids = torch.full((M, 1), 5, dtype=torch.int32, device=DEVICE)
    weights = (torch.rand(M, 1) + 0.5).to(DEVICE)
    for deterministic in (False, True):
        out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=deterministic)
        assert _rel_err(out, _reference(spec, x, ids, weights, w)) < 3e-3


def test_odd_sizes_single_split_and_model_dtype_output():
    spec = _spec(hidden_size=50, intermediate_size=24, num_experts=5, top_k=3)
    w = random_weights(spec, seed=3, device=DEVICE)
    x = _x(7, 50)
    ids, weights = _routing(spec, 7, experts_allowed=[0, 2, 3])  # experts 1 and 4 get no tokens
    cfg = ExpertConfig(16, GemmTiles(16, 16, programs_per_sm=2), GemmTiles(16, 16, split_k=1, programs_per_sm=3))
    ref = _reference(spec, x, ids, weights, w)
    for deterministic in (False, True):
        out = experts.fused_experts(spec, x, ids, weights, w, config=cfg, deterministic=deterministic,
                                    out_dtype=torch.float16)
        assert out.dtype == torch.float16
        assert _rel_err(out, ref) < 3e-3


def test_deterministic_is_bitwise_repeatable_and_close_to_atomic():
    spec = _spec()
    w = random_weights(spec, seed=7, device=DEVICE)
    x = _x(9, spec.hidden_size)
    ids, weights = _routing(spec, 9)
    a = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=True)
    b = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=True)
    c = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_expert_parallel_partial_sum(deterministic):
    spec = _spec(num_experts=12, num_local_experts=3, top_k=4)
    w = random_weights(spec, seed=11, device=DEVICE)  # local experts are global 0, 4, 8
    M = 10
    x = _x(M, spec.hidden_size)
    ids, weights = _routing(spec, M)
    ids[0] = torch.tensor([1, 2, 3, 5], dtype=torch.int32, device=DEVICE)  # a token with no local expert at all
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=deterministic)
    ref = _reference(spec, x, ids, weights, w)
    assert _rel_err(out, ref) < 3e-3
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_weight_on_input():
    spec = _spec(top_k=1, weight_on="input")
    w = random_weights(spec, seed=5, device=DEVICE)
    x = _x(6, spec.hidden_size)
    ids, weights = _routing(spec, 6)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL)
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < 3e-3


def test_given_alignment_is_used_and_checked():
    spec = _spec()
    w = random_weights(spec, device=DEVICE)
    x = _x(4, spec.hidden_size)
    ids, weights = _routing(spec, 4)
    alignment = reference.align_pairs(ids, None, spec.num_local_experts, SMALL.block_m)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, alignment=alignment)
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < 3e-3
    wrong = reference.align_pairs(ids, None, spec.num_local_experts, 32)
    with pytest.raises(experts.Unsupported, match="block_m"):
        experts.fused_experts(spec, x, ids, weights, w, config=SMALL, alignment=wrong)


# --------------------------------------------------------------------------- fp8
def _fp8_case(seed, M, **changes):
    spec = _spec(quant="fp8_block", hidden_size=200, intermediate_size=136, **changes)
    w = random_weights(spec, seed=seed, device=DEVICE)
    x = _x(M, spec.hidden_size)
    return spec, w, x


@pytest.mark.parametrize("given_x_fp8", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fp8_matches_reference_emulation(given_x_fp8, deterministic):
    spec, w, x = _fp8_case(seed=2, M=6)
    ids, weights = _routing(spec, 6)
    extra = {}
    if given_x_fp8:
        extra["x_fp8"], extra["x_scale"] = reference.quantize_fp8_groups(x)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL_FP8, deterministic=deterministic, **extra)
    # Same fp8 products and scales as the emulation: only the fp32 summation order differs.
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < FP8_TOL


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp8_k_steps_of_several_scale_groups(deterministic):
    """BLOCK_K = 256: two 128-wide groups per K step, each with its own scales; H = 200 and
    I = 136 end inside a step's second group, and GEMM2's second split is empty."""
    spec, w, x = _fp8_case(seed=9, M=7)
    ids, weights = _routing(spec, 7)
    cfg = ExpertConfig(16, GemmTiles(32, 256, programs_per_sm=1), GemmTiles(32, 256, split_k=2, programs_per_sm=1))
    out = experts.fused_experts(spec, x, ids, weights, w, config=cfg, deterministic=deterministic)
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < FP8_TOL


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_swapped_operands_match_reference(fp8, deterministic):
    """swap_ab: both GEMMs compute weights . tokens^T and transpose the tile before the epilogue;
    with a gated dense tail and 19 tokens (two token tiles, the second partial)."""
    if fp8:
        spec, w, x = _fp8_case(seed=17, M=19, shared_intermediate_size=136, shared_gate=True)
        # On the GPU swapped fp8 tiles run on the native fp8 MMA, whose sums within a group are
        # not fp32 (benchmarks/gpu_experts.fp8_tolerance); the interpreter's dot is exact.
        tiles, tol = (GemmTiles(32, 256, swap_ab=True), GemmTiles(64, 128, split_k=2, swap_ab=True)), FP8_TOL * 5
        tol = tol if DEVICE == "cpu" else 1e-2
    else:
        spec = _spec(shared_intermediate_size=40, shared_gate=True)
        w = random_weights(spec, seed=17, device=DEVICE)
        x = _x(19, spec.hidden_size)
        tiles, tol = (GemmTiles(16, 32, swap_ab=True), GemmTiles(32, 32, split_k=2, swap_ab=True)), 3e-3
    ids, weights = _routing(spec, 19)
    out = experts.fused_experts(spec, x, ids, weights, w, config=ExpertConfig(16, *tiles), deterministic=deterministic,
                                shared=experts.shared_tail(spec, w))
    assert _rel_err(out, _shared_reference(spec, x, ids, weights, w)) < tol


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_split_gemm1_matches_reference(fp8, swap_ab):
    """GEMM1 split over K (3 splits, the last one short) and finished by gemm1_combine_kernel;
    expert parallel with a gated dense tail, atomic and deterministic."""
    changes = dict(num_experts=8, num_local_experts=4, shared_intermediate_size=136 if fp8 else 40, shared_gate=True)
    if fp8:
        spec, w, x = _fp8_case(seed=18, M=19, **changes)
        g1, g2 = GemmTiles(32, 128, split_k=3, swap_ab=swap_ab), GemmTiles(32, 128, split_k=2, swap_ab=swap_ab)
        tol = FP8_TOL * 5 if DEVICE == "cpu" or not swap_ab else 1e-2  # see test_swapped_operands_match_reference
    else:
        spec = _spec(**changes)
        w = random_weights(spec, seed=18, device=DEVICE)
        x = _x(19, spec.hidden_size)
        g1, g2, tol = GemmTiles(16, 16, split_k=3, swap_ab=swap_ab), GemmTiles(32, 32, split_k=2, swap_ab=swap_ab), 3e-3
    ids, weights = _routing(spec, 19)
    ref = _shared_reference(spec, x, ids, weights, w)
    outs = [experts.fused_experts(spec, x, ids, weights, w, config=ExpertConfig(16, g1, g2), deterministic=det,
                                  shared=experts.shared_tail(spec, w)) for det in (False, True)]
    for out in outs:
        assert _rel_err(out, ref) < tol


def test_pdl_mode_auto_places_gemm2_early_in_each_launchs_range(monkeypatch):
    """The default "auto" resolves by M and launch on CUDA; a forced mode holds at every M; elsewhere "off"."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(experts, "EXPERT_PDL", "auto")
    for launch, below in (("routed", experts.ROUTED_GEMM2_EARLY_BELOW_M),
                          ("shared", experts.SHARED_GEMM2_EARLY_BELOW_M)):
        edges = (experts.GEMM2_EARLY_FROM_M - 1, experts.GEMM2_EARLY_FROM_M, below - 1, below)
        assert [experts.pdl_mode(cuda, m, launch) for m in edges] == ["h", "h+gemm2", "h+gemm2", "h"], launch
    assert experts.pdl_mode(cuda, 64) == experts.pdl_mode(cuda, 64, "routed")
    assert experts.pdl_mode(torch.device("cpu"), 2) == "off"
    monkeypatch.setattr(experts, "EXPERT_PDL", "h+gemm2")
    assert [experts.pdl_mode(cuda, m, "shared") for m in (1, 64)] == ["h+gemm2", "h+gemm2"]
    monkeypatch.setattr(experts, "EXPERT_PDL", "h+gemm")
    with pytest.raises(ValueError, match="MOE_FUSION_EXPERT_PDL"):
        experts.pdl_mode(cuda, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", experts.PDL_MODES)
@pytest.mark.parametrize("case", ["fp8-split", "fp8", "fp16-split"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_programmatic_dependent_launches_match_reference(case, mode, ids_dtype, monkeypatch):
    """experts.EXPERT_PDL: the launch that prepares h (gemm1_combine_kernel after a split GEMM1,
    fp8_act_quant_kernel otherwise) waits for GEMM1, and GEMM2 for it; fp8's x quantisation runs
    beside the block's own alignment (int64 ids read as they are); eager, and replayed as a CUDA
    graph on fresh inputs, against the reference each time."""
    monkeypatch.setattr(experts, "EXPERT_PDL", mode)
    split = 3 if case.endswith("-split") else 1
    ep = dict(num_experts=8, num_local_experts=4)
    if case.startswith("fp8"):
        spec, w, x = _fp8_case(seed=21, M=19, **ep)
        g1, g2, tol = GemmTiles(64, 128, split_k=split, swap_ab=True), GemmTiles(64, 128, split_k=2, swap_ab=True), 1e-2
    else:
        spec = _spec(**ep)
        w = random_weights(spec, seed=21, device=DEVICE)
        x = _x(19, spec.hidden_size)
        g1, g2, tol = GemmTiles(16, 16, split_k=split), GemmTiles(32, 32, split_k=2), 3e-3
    ids, weights = _routing(spec, 19)
    ids = ids.to(ids_dtype)
    cfg = ExpertConfig(16, g1, g2)

    def call():
        return experts.fused_experts(spec, x, ids, weights, w, config=cfg)

    assert _rel_err(call(), _reference(spec, x, ids, weights, w)) < tol
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(2):
        x.copy_(_x(*x.shape))
        fresh_ids, fresh_weights = _routing(spec, 19)
        ids.copy_(fresh_ids)
        weights.copy_(fresh_weights)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, _reference(spec, x, ids, weights, w)) < tol


def test_fp8_activation_quantisation_kernel_matches_reference():
    spec, w, x = _fp8_case(seed=6, M=5)
    ids, weights = _routing(spec, 5)
    launch = experts.ExpertLaunch(x=x, pair_weights=weights.reshape(-1), topk_ids=ids,
                                  experts=experts.ExpertTensors.of(spec, w), alignment=None,
                                  weight_on_input=False, num_sms=4)
    launch.allocate(SMALL_FP8, False, torch.float32)
    launch.quantize_input()
    q_ref, s_ref = reference.quantize_fp8_groups(x)
    assert torch.equal(launch.a.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(launch.a_scale, s_ref)


@pytest.mark.parametrize("block_n", [16, 32, 128])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_fp8_h_quantised_in_gemm1_epilogue_is_bitwise_the_kernels(block_n, n_shared, monkeypatch):
    """The last program of each (tile, 128-column group) quantises h exactly as fp8_act_quant_kernel
    would (I = 136: one full group, one of 8 columns), and leaves the tickets zero for the next launch."""
    monkeypatch.setattr(experts, "FUSED_H_QUANT", True)
    spec, w, x = _fp8_case(seed=10, M=7, shared_intermediate_size=136 * n_shared)
    ids, weights = _routing(spec, 7)
    cfg = ExpertConfig(16, GemmTiles(block_n, 128, programs_per_sm=1), SMALL_FP8.gemm2)
    shared = experts.shared_tail(spec, w) if n_shared else None
    launch = experts.ExpertLaunch(x=x, pair_weights=weights.reshape(-1).float(), topk_ids=ids,
                                  experts=experts.ExpertTensors.of(spec, w),
                                  alignment=reference.align_pairs(ids, None, spec.num_local_experts, 16),
                                  weight_on_input=False, num_sms=4, shared=shared)
    launch.allocate(cfg, False, torch.float32)
    launch.quantize_input()
    launch.gemm1(cfg)
    assert launch.h_quantized
    q_ref, s_ref = reference.quantize_fp8_groups(launch.h)  # every row is a real pair or shared row
    assert torch.equal(launch.h_scale, s_ref)
    assert torch.equal(launch.h_fp8.view(torch.uint8), q_ref.view(torch.uint8))
    assert all(int(t.abs().sum()) == 0 for t in experts._tickets.values())


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp8_with_h_quantised_in_gemm1_matches_reference(deterministic, monkeypatch):
    monkeypatch.setattr(experts, "FUSED_H_QUANT", True)
    spec, w, x = _fp8_case(seed=11, M=5, shared_intermediate_size=136)
    ids, weights = _routing(spec, 5)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL_FP8, deterministic=deterministic,
                                shared=experts.shared_tail(spec, w))
    assert _rel_err(out, _shared_reference(spec, x, ids, weights, w)) < FP8_TOL * 5


def test_fp8_weight_on_input():
    spec, w, x = _fp8_case(seed=8, M=6, top_k=1, weight_on="input")
    ids, weights = _routing(spec, 6)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL_FP8)
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < FP8_TOL


def test_fp8_expert_parallel():
    spec, w, x = _fp8_case(seed=4, M=8, num_experts=8, num_local_experts=2)
    ids, weights = _routing(spec, 8)
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL_FP8)
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < FP8_TOL


def test_fp8_weight_quantisation_kernel_matches_reference():
    w = _x(3, 200, 136) * 3
    w = w.transpose(1, 2)  # strided input [3, 136, 200]
    q, scale = experts.quantize_fp8_blocks(w)
    q_ref, scale_ref = reference.quantize_fp8_blocks(w)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quantize_expert_weights_fp8_gives_an_fp8_layer():
    spec = _spec()
    w = random_weights(spec, device=DEVICE)
    spec8, w8 = experts.quantize_expert_weights_fp8(spec, w)
    assert spec8.fp8 and w8.w_gate.dtype == FP8_DTYPE
    w8.check(spec8)
    x = _x(5, spec.hidden_size)
    ids, weights = _routing(spec, 5)
    out = experts.fused_experts(spec8, x, ids, weights, w8, config=SMALL_FP8)
    assert _rel_err(out, _reference(spec8, x, ids, weights, w8)) < FP8_TOL
    # and the fp8 layer stays close to the bf16 one
    assert _rel_err(out, _reference(spec, x, ids, weights, w)) < 0.1


# --------------------------------------------------------------------------- shared experts
@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts_separately(shared_gate):
    spec = _spec(shared_intermediate_size=80, shared_gate=shared_gate)
    w = random_weights(spec, seed=9, device=DEVICE)
    x = _x(5, spec.hidden_size)
    out = experts.shared_experts(spec, x, w)
    ref = reference.shared_experts(spec.replace(dtype="float32"), x.float(), _fp32_weights(w))
    assert _rel_err(out, ref) < 5e-3


def _shared_reference(spec, x, ids, weights, w):
    """Routed + shared experts: fp32 for fp16 specs; for fp8 the fp8 emulation of both (the shared
    MLP chunked and block-quantised, reference.shared_experts_fp8)."""
    if spec.fp8:
        return reference.routed_experts(spec, x, ids, weights, w) + reference.shared_experts_fp8(spec, x, w)
    s32, w32 = spec.replace(dtype="float32"), _fp32_weights(w)
    return reference.routed_experts(s32, x.float(), ids, weights, w32) + reference.shared_experts(s32, x.float(), w32)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shared_gate", [False, True])
@pytest.mark.parametrize("M,n_shared,expert_parallel", [(1, 1, False), (19, 2, False), (7, 2, True)])
def test_shared_experts_as_dense_tail(M, n_shared, expert_parallel, shared_gate, deterministic):
    changes = dict(num_experts=8, num_local_experts=4) if expert_parallel else {}
    spec = _spec(shared_intermediate_size=40 * n_shared, shared_gate=shared_gate, **changes)
    w = random_weights(spec, seed=13 + M, device=DEVICE)
    x = _x(M, spec.hidden_size)
    ids, weights = _routing(spec, M)
    tail = experts.shared_tail(spec, w)
    assert tail.count == n_shared and tail.experts.w_down.data_ptr() == w.shared_down.data_ptr()  # views, no copy
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=deterministic, shared=tail)
    assert _rel_err(out, _shared_reference(spec, x, ids, weights, w)) < 3e-3


def test_dense_tail_with_no_local_routed_expert():
    """EP: no token hits a local expert, so only the dense tail has work."""
    spec = _spec(num_experts=8, num_local_experts=2, shared_intermediate_size=40, shared_gate=True)
    w = random_weights(spec, seed=3, device=DEVICE)  # local experts are global 0 and 4
    x = _x(5, spec.hidden_size)
    ids, weights = _routing(spec, 5, experts_allowed=[1, 2, 3, 5, 6, 7])
    for deterministic in (False, True):
        out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL, deterministic=deterministic,
                                    shared=experts.shared_tail(spec, w))
        assert _rel_err(out, _shared_reference(spec, x, ids, weights, w)) < 3e-3


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shared_gate", [False, True])
def test_fp8_shared_experts_as_dense_tail(shared_gate, deterministic):
    spec, w, x = _fp8_case(seed=12, M=5, shared_intermediate_size=272, shared_gate=shared_gate)  # 2 chunks of 136
    ids, weights = _routing(spec, 5)
    x_fp8, x_scale = reference.quantize_fp8_groups(x)
    tail = experts.shared_tail(spec, w)
    assert tail.count == 2 and tail.experts.fp8
    out = experts.fused_experts(spec, x, ids, weights, w, config=SMALL_FP8, deterministic=deterministic,
                                shared=tail, x_fp8=x_fp8, x_scale=x_scale)
    # The gate logit is a model-dtype dot in both; only summation orders differ.
    assert _rel_err(out, _shared_reference(spec, x, ids, weights, w)) < FP8_TOL * 5


def test_fp8_shared_copies_are_cached_per_weights_and_version():
    spec, w, _ = _fp8_case(seed=14, M=1, shared_intermediate_size=136)
    first = experts.shared_tail(spec, w).experts
    assert experts.shared_tail(spec, w).experts is first
    q, scale = reference.quantize_fp8_blocks(w.shared_gate.unsqueeze(0))
    assert torch.equal(first.w_gate.view(torch.uint8), q.view(torch.uint8)) and torch.equal(first.w_gate_scale, scale)
    w.shared_up.mul_(2)  # an in-place update bumps the version: new copies
    second = experts.shared_tail(spec, w).experts
    assert second is not first
    assert torch.equal(second.w_up_scale, reference.quantize_fp8_blocks(w.shared_up.unsqueeze(0))[1])
    other = random_weights(spec, seed=15, device=DEVICE)  # other tensors: their own copies
    assert experts.shared_tail(spec, other).experts is not second


def test_dense_tail_refuses_what_it_cannot_express():
    assert experts.shared_tail_problem(_spec(shared_intermediate_size=60)) is not None  # 60 = 1.5 x 40
    assert experts.shared_tail_problem(_spec(top_k=1, weight_on="input", shared_intermediate_size=40)) is not None
    with pytest.raises(experts.Unsupported, match="multiple"):
        experts.shared_tail(_spec(shared_intermediate_size=60), None)


# --------------------------------------------------------------------------- what is refused
def test_unsupported_inputs_are_refused_with_a_reason():
    spec = _spec()
    w = random_weights(spec, device=DEVICE)
    ids, weights = _routing(spec, 3)
    with pytest.raises(experts.Unsupported, match="spec says"):
        experts.fused_experts(spec, _x(3, spec.hidden_size).float(), ids, weights, w)
    s32 = spec.replace(dtype="float32")
    with pytest.raises(experts.Unsupported, match="bf16/fp16"):
        experts.fused_experts(s32, _x(3, spec.hidden_size).float(), ids, weights, _fp32_weights(w))
    with pytest.raises(experts.Unsupported, match="do not match"):
        experts.fused_experts(spec, _x(4, spec.hidden_size), ids, weights, w)
    bad = ExpertConfig(16, GemmTiles(16, 64), GemmTiles(16, 128))
    spec8, w8 = experts.quantize_expert_weights_fp8(spec, w)
    with pytest.raises(experts.Unsupported, match="multiple of 128"):
        experts.fused_experts(spec8, _x(3, spec.hidden_size), ids, weights, w8, config=bad)


# --------------------------------------------------------------------------- configs
def test_shipped_table_entries_are_valid_configs():
    for device, shapes in expert_configs.read_table(expert_configs.TABLE_PATH).items():
        for name, buckets in shapes.items():
            for bucket, entry in buckets.items():
                cfg = ExpertConfig.from_dict(entry)
                assert expert_configs.validate(cfg, name.startswith("fp8")) is None, (device, name, bucket)


def test_a_gpu_with_the_sms_of_a_tuned_one_takes_its_entries(monkeypatch):
    """The H200 (the H100's SMs) gets the H100's tuned tiles until it has entries of its own;
    another GPU gets the heuristic."""
    key = ProblemKey("fp8", 7168, 2048, 32, 256, 8)
    tuned = ExpertConfig(16, GemmTiles(64, 256, split_k=4, swap_ab=True), GemmTiles(64, 256, split_k=2))
    table = {"NVIDIA H100 80GB HBM3": {key.name(): {"1": tuned.to_dict()}}}
    monkeypatch.setattr(expert_configs, "read_table", lambda path: table)
    assert expert_configs.lookup(key, 1, "NVIDIA H200", 132) == (tuned, "table")
    assert expert_configs.lookup(key, 1, "another GPU", 132)[1] == "heuristic"
    table["NVIDIA H200"] = {}
    assert expert_configs.lookup(key, 1, "NVIDIA H200", 132)[1] == "heuristic"  # its own (empty) entries win


@pytest.mark.parametrize("fp8", [False, True])
def test_heuristic_configs_are_valid_and_fill_the_gpu(fp8):
    for E_local, E in ((256, 256), (32, 256), (128, 128), (8, 8)):
        key = ProblemKey("fp8" if fp8 else "bfloat16", 7168, 2048, E_local, E, 8)
        for m in expert_configs.M_BUCKETS:
            cfg = expert_configs.heuristic(key, m, num_sms=132)
            assert expert_configs.validate(cfg, fp8) is None
    one_expert = expert_configs.heuristic(ProblemKey("bfloat16", 7168, 2048, 32, 256, 8), 1, num_sms=132)
    assert 2048 // one_expert.gemm1.block_n >= 128  # a single active expert still spans the SMs


@pytest.mark.parametrize("local_experts,fp8,n_sets,copies", [(1, True, 8, 3), (1, False, 2, 2), (64, False, 8, 1)])
def test_tuner_rotates_over_weight_copies_where_the_experts_would_stay_in_l2(local_experts, fp8, n_sets, copies,
                                                                              monkeypatch):
    """tune_experts.weight_copies: a shape whose weights fit ROTATED_WEIGHT_BYTES a few times over gets
    copies up to those bytes and at most one per input set, each equal to the original in its own
    memory; a shape larger than the bytes none."""
    from moe_fusion.lowering import tune_experts
    H, I = 256, 128
    e = experts.ExpertTensors(*(torch.randn(local_experts, n, k) for n, k in ((I, H), (I, H), (H, I))))
    if fp8:
        e = experts.quantize_expert_tensors_fp8(e)
    monkeypatch.setattr(tune_experts, "ROTATED_WEIGHT_BYTES", 3 * tune_experts.expert_bytes(e) - 1)
    got = tune_experts.weight_copies(e, n_sets)
    assert len(got) == copies and got[0] is e
    for copy in got[1:]:
        for name in ("w_gate", "w_up", "w_down", "w_gate_scale", "w_up_scale", "w_down_scale"):
            original, copied = getattr(e, name), getattr(copy, name)
            assert (original is None) == (copied is None)
            if original is not None:
                assert copied.data_ptr() != original.data_ptr() and torch.equal(copied.float(), original.float())
