"""The whole layer on the kernels (preamble + expert block + shared expert) against the reference.

CPU: the kernels through the Triton interpreter at small fp16 (and fp8) shapes, shared expert
inline or fused into the expert kernels.
GPU: bf16/fp8 at DeepSeek-V3 sizes, shared expert on the side stream, inline and fused, deterministic
and atomic, eager and under CUDA-graph capture and torch.compile(mode="reduce-overhead").
The expected output is computed in float64 from the routing the kernels chose (so a bf16 near-tie
that flips an expert is not mistaken for a wrong kernel); the preamble tests check the routing.
"""
import pytest
import torch

from moe_fusion.lowering import experts, layer, layer_output_kernel, preamble, reference
from moe_fusion.ops import call_moe_layer

from moe_cases import dsv3_like, float64_weights, random_weights, relative_error


def _expected(spec, x, w, plan):
    pre = preamble.fused_preamble(spec, x, w, block_m=plan.expert_config.block_m)
    w64 = float64_weights(w)
    normed = pre.normed.double()
    out = reference.routed_experts(spec.replace(dtype="float32"), normed, pre.topk_ids, pre.topk_weights.double(), w64)
    if spec.has_shared_experts:
        # "fused" with fp8 experts, and MOE_FUSION_SHARED_FP8, compute the shared expert in fp8 (README).
        out = out + (reference.shared_experts_fp8 if plan.shared_fp8 else reference.shared_experts)(spec, normed, w64)
    return out


def _with_options(monkeypatch, **values):
    for k, v in values.items():
        monkeypatch.setattr(layer.options, k, v)


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("deterministic", [False, True])
def test_layer_on_interpreter(M, deterministic, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter variant runs where there is no GPU")
    _with_options(monkeypatch, deterministic=deterministic)
    spec = dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=24)
    _check_fp16_layer(spec, M, "inline", seed=0)


def _check_fp16_layer(spec, M, shared_strategy, seed):
    """The planned fp16 layer (with the expected shared-expert strategy) against the reference."""
    w = random_weights(spec, seed=seed)
    x = torch.randn(M, spec.hidden_size).half()
    plan = layer.plan_layer(spec, M, x.device)
    assert plan.shared_expert == shared_strategy
    got = layer.moe_layer(spec, x, w, plan)
    assert got.dtype == torch.float16
    assert relative_error(got, _expected(spec, x, w, plan)) < 2e-3


@pytest.mark.parametrize("shared_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3])
def test_layer_output_kernel_is_the_fp32_sum_rounded_once(M, shared_dtype):
    """layer_output_kernel against torch's add into the model dtype, bit for bit (fp16 on the CPU:
    the interpreter's bf16 cast truncates; bf16 too, and the programmatic dependent launch, on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    H = 2 * layer_output_kernel.BLOCK + 72  # several programs, the last one partial
    routed = torch.randn(M, H, device=device) * 3
    shared = torch.randn(M, H, device=device).to(shared_dtype) if shared_dtype else None
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float16,)
    for dtype, pdl in [(d, p) for d in dtypes for p in ((False, True) if device == "cuda" else (False,))]:
        want = (routed + shared.float() if shared is not None else routed).to(dtype)
        assert torch.equal(layer_output_kernel.layer_output(routed, shared, dtype, pdl), want)


# (M, shared gate, shared experts, deterministic, fp8, expert parallel): fp16 stands in for bf16 on the
# interpreter; every combination of M = 1 / odd M, gate, 1 or 2 shared experts, reduction, fp8 and EP appears.
FUSED_CASES = [
    (1, False, 1, False, False, False),
    (5, True, 2, True, False, False),
    (7, True, 1, False, False, True),
    (1, True, 2, True, True, False),
    (5, False, 1, False, True, True),
]


@pytest.mark.parametrize("M,gate,n_shared,deterministic,fp8,ep", FUSED_CASES)
def test_fused_shared_experts_on_interpreter(M, gate, n_shared, deterministic, fp8, ep, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter variant runs where there is no GPU")
    _with_options(monkeypatch, deterministic=deterministic, shared_expert="fused")
    spec = dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=24 * n_shared,
                     shared_gate=gate, quant="fp8_block" if fp8 else "none", **(dict(num_local_experts=4) if ep else {}))
    _check_fp16_layer(spec, M, "fused", seed=M)


# (M, shared gate, shared experts, deterministic, expert parallel, fp8 routed experts, fp8 shared expert)
SHARED_ON_ITS_OWN_LAUNCH_CASES = [
    (1, False, 1, False, True, True, True),
    (5, True, 2, True, False, True, True),
    (1, False, 1, False, True, True, False),
    (5, True, 2, True, False, False, False),
]


@pytest.mark.parametrize("M,gate,n_shared,deterministic,ep,fp8,shared_fp8", SHARED_ON_ITS_OWN_LAUNCH_CASES)
def test_shared_expert_on_its_own_expert_launch(M, gate, n_shared, deterministic, ep, fp8, shared_fp8, monkeypatch):
    """A separate shared expert as a launch of the expert kernels of its own (on the side stream on
    CUDA; in order on the interpreter): in fp8 with MOE_FUSION_SHARED_FP8, else in the model dtype
    ("inline-kernels"), whatever the routed experts' dtype."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter variant runs where there is no GPU")
    _with_options(monkeypatch, deterministic=deterministic, shared_fp8=shared_fp8,
                  shared_expert="inline" if shared_fp8 else "inline-kernels")
    spec = dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=24 * n_shared,
                     shared_gate=gate, quant="fp8_block" if fp8 else "none", **(dict(num_local_experts=4) if ep else {}))
    plan = layer.plan_layer(spec, M, torch.device("cpu"))
    assert (plan.shared_on_kernels, plan.shared_fp8) == (True, shared_fp8)
    launches = []
    real = layer.SharedExpertOnExpertKernels
    monkeypatch.setattr(layer, "SharedExpertOnExpertKernels", lambda *a: launches.append(a) or real(*a))
    _check_fp16_layer(spec, M, "inline", seed=M)
    assert len(launches) == 1


@pytest.mark.parametrize("shared_expert", ["inline", "fused"])
def test_fp8_experts_from_model_dtype_weights_on_interpreter(shared_expert, monkeypatch):
    """quant fp8_block_quantize (the backend's fp8_experts): fp16 expert weights, run as fp8 blocks
    quantised once on the way in; the plan is the fp8 layer's."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter variant runs where there is no GPU")
    _with_options(monkeypatch, shared_expert=shared_expert)
    spec = dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=24,
                     quant="fp8_block_quantize")
    plan = layer.plan_layer(spec, 3, torch.device("cpu"))
    assert plan.shared_fp8 == (shared_expert == "fused")
    assert plan.expert_config == layer.plan_layer(spec.as_run(), 3, torch.device("cpu")).expert_config
    _check_fp16_layer(spec, 3, shared_expert, seed=3)


def test_fused_is_refused_where_the_kernels_cannot_take_the_shared_expert(monkeypatch, caplog):
    _with_options(monkeypatch, shared_expert="fused")
    spec = dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=36)
    with caplog.at_level("WARNING", logger="moe_fusion.lowering"):
        plan = layer.plan_layer(spec, 3, torch.device("cpu"))
    assert plan.shared_expert == "inline" and "not a multiple" in caplog.text
    _with_options(monkeypatch, shared_expert="sideways")
    with pytest.raises(ValueError, match="fused"):
        layer.plan_layer(spec, 3, torch.device("cpu"))


GPU_SPECS = {
    "dsv3-ep8": dsv3_like(hidden_size=7168, num_experts=256, n_group=8, topk_group=4, top_k=8, intermediate_size=2048,
                      shared_intermediate_size=2048, dtype="bfloat16", num_local_experts=32),
    "dsv3-ep8-fp8": dsv3_like(hidden_size=7168, num_experts=256, n_group=8, topk_group=4, top_k=8,
                              intermediate_size=2048, shared_intermediate_size=2048, dtype="bfloat16",
                              num_local_experts=32, quant="fp8_block"),
    # bf16 weights, experts run in fp8 (the backend's fp8_experts option)
    "dsv3-ep8-fp8-from-bf16": dsv3_like(hidden_size=7168, num_experts=256, n_group=8, topk_group=4, top_k=8,
                                        intermediate_size=2048, shared_intermediate_size=2048, dtype="bfloat16",
                                        num_local_experts=32, quant="fp8_block_quantize"),
    "qwen2-like-gated-shared": dsv3_like(hidden_size=2048, num_experts=60, n_group=1, topk_group=1, top_k=4,
                                         intermediate_size=1408, shared_intermediate_size=5632, shared_gate=True,
                                         scoring="softmax", correction_bias=False, router_fp32=False,
                                         renormalize=False, renormalize_eps=0.0, routed_scaling_factor=1.0,
                                         dtype="bfloat16"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name,shared_expert", [(n, s) for n in GPU_SPECS for s in ("stream", "inline", "fused")]
                         + [("dsv3-ep8-fp8", "stream-fp8"), ("dsv3-ep8-fp8", "stream-kernels"),
                            ("qwen2-like-gated-shared", "stream-kernels"), ("dsv3-ep8-fp8", "stream-late-fp8"),
                            ("dsv3-ep8", "stream-late")])
@pytest.mark.parametrize("deterministic", [False, True])
def test_layer_on_gpu(name, shared_expert, deterministic, monkeypatch):
    """"stream-fp8" / "stream-kernels": the shared expert on the side stream as its own launch of the
    expert kernels, in fp8 / in bf16; "-late": its GEMM2 forked after the routed GEMM1."""
    fp8_shared = shared_expert.endswith("-fp8")
    _with_options(monkeypatch, deterministic=deterministic, shared_expert=shared_expert.replace("-fp8", ""),
                  shared_fp8=fp8_shared)
    spec = GPU_SPECS[name]
    w = random_weights(spec, device="cuda")
    fp8 = spec.as_run().fp8
    tolerance = 3e-2 if fp8 else 1e-2
    for M in (1, 4, 30, 33):  # 30: GEMM2 placed early in the routed launch only (experts.pdl_mode)
        x = torch.randn(M, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
        plan = layer.plan_layer(spec, M, x.device)
        assert plan.shared_fp8 == (fp8_shared or fp8 and shared_expert == "fused")
        assert plan.shared_gemm2_late == ("-late" in shared_expert)
        got = layer.moe_layer(spec, x, w, plan)
        torch.cuda.synchronize()
        assert relative_error(got, _expected(spec, x, w, plan)) < tolerance, (M, plan)


@pytest.mark.gpu
@pytest.mark.parametrize("name,shared_expert", [("dsv3-ep8", "stream"), ("dsv3-ep8-fp8", "fused"),
                                                ("dsv3-ep8-fp8", "stream-fp8"), ("dsv3-ep8-fp8", "stream-kernels"),
                                                ("dsv3-ep8-fp8", "stream-late-fp8"),
                                                ("dsv3-ep8-fp8-from-bf16", "stream")])
@pytest.mark.parametrize("deterministic", [False, True])
def test_layer_op_under_cuda_graphs(name, shared_expert, deterministic, monkeypatch):
    """The op captured in a CUDA graph and replayed on new inputs; deterministic replays are bitwise equal.
    fp8-from-bf16: the warm-up call makes the fp8 expert copies, which the graph then reads."""
    _with_options(monkeypatch, deterministic=deterministic, shared_expert=shared_expert.replace("-fp8", ""),
                  shared_fp8=shared_expert.endswith("-fp8"))
    spec = GPU_SPECS[name]
    w = random_weights(spec, device="cuda")
    x = torch.randn(4, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    call_moe_layer(spec, x, w)  # warm-up: compile kernels, make the side stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call_moe_layer(spec, x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    first = out.clone()
    plan = layer.plan_layer(spec, 4, x.device)
    assert relative_error(first, _expected(spec, x, w, plan)) < (3e-2 if spec.as_run().fp8 else 1e-2)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, first, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_deterministic_layer_runs_are_bitwise_equal(monkeypatch):
    """Deterministic mode: router without split-K atomics, expert block in fixed order."""
    _with_options(monkeypatch, deterministic=True, shared_expert="stream")
    spec = GPU_SPECS["dsv3-ep8"]
    w = random_weights(spec, device="cuda")
    x = torch.randn(4, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    first_routing = preamble.fused_preamble(spec, x, w, block_m=16, deterministic=True).topk_weights
    first = call_moe_layer(spec, x, w)
    for _ in range(50):
        routing = preamble.fused_preamble(spec, x, w, block_m=16, deterministic=True).topk_weights
        assert torch.equal(routing, first_routing), "routing weights differ between runs"
        assert torch.equal(call_moe_layer(spec, x, w), first)


@pytest.mark.gpu
def test_constants_first_made_in_a_graph_warmup_stay_out_of_its_pool(monkeypatch):
    """reduce-overhead warms each new graph up eagerly, its allocations routed to the graph's private pool. The
    shared expert's dense routing, cached on its first call at a new M, must not be made there: the graph trees
    refuse a live tensor in the pool that is not an output ("tensor(s) in the cudagraph pool not tracked")."""
    _with_options(monkeypatch, shared_expert="stream")  # the shared expert as a launch of its own: dense routing
    monkeypatch.setattr(experts, "_dense_routing_cache", {})
    _check_in_reduce_overhead_compile(GPU_SPECS["dsv3-ep8"], (3, 3, 5, 5))
    assert {key[1] for key in experts._dense_routing_cache} == {3, 5}


@pytest.mark.gpu
def test_layer_op_in_reduce_overhead_compile():
    _check_in_reduce_overhead_compile(GPU_SPECS["dsv3-ep8"], (1, 4, 4, 4))


def _check_in_reduce_overhead_compile(spec, sizes):
    w = random_weights(spec, device="cuda")

    def moe(x):
        return call_moe_layer(spec, x, w) * 1.0

    compiled = torch.compile(moe, mode="reduce-overhead", dynamic=False)
    for M in sizes:
        x = torch.randn(M, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
        got = compiled(x).clone()
        assert relative_error(got, _expected(spec, x, w, layer.plan_layer(spec, M, x.device))) < 1e-2
