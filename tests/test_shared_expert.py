import pytest
import torch

from moe_fusion.lowering import experts, reference, streams
from moe_fusion.lowering.shared_expert import (OneWaveSharedExpert, SharedExpertBuffers, SharedExpertOnExpertKernels,
                                               shared_expert_into)

from moe_cases import dsv3_like, random_weights


def _poisoned(spec, x):
    buffers = SharedExpertBuffers.allocate(spec, x)
    for t in (buffers.gate, buffers.up, buffers.out, buffers.gate_logit):
        t.fill_(float("nan"))
    return buffers


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_into_equals_reference(gated):
    spec = dsv3_like(shared_gate=gated, shared_intermediate_size=48)
    w = random_weights(spec)
    x = torch.randn(5, spec.hidden_size)
    buffers = _poisoned(spec, x)
    shared_expert_into(spec, x, w, buffers)
    torch.testing.assert_close(buffers.out, reference.shared_experts(spec, x, w))


@pytest.mark.gpu
def test_side_stream_overlap_is_graph_capturable():
    """The shared expert as the layer forks it: its own launch of the expert kernels on the side stream
    (buffers allocated before the fork), captured in a graph beside main-stream work."""
    spec = dsv3_like(shared_gate=True, dtype="bfloat16")
    w = random_weights(spec, device="cuda")
    x = torch.randn(7, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    expected = reference.shared_experts(spec, x, w)
    job = SharedExpertOnExpertKernels(spec, x, None, None, w, in_fp8=False, deterministic=False)

    def step():
        streams.fork(x.device, job.run)
        doubled = x * 2
        streams.join(x.device)
        return doubled

    step()  # warm-up outside capture (compilation, side stream creation)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        doubled = step()
    job.out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(job.out.to(x.dtype), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(doubled, x * 2)


@pytest.mark.parametrize("M,n,block_m", [(1, 1, 16), (5, 2, 4), (16, 3, 16), (1030, 1, 16)])
def test_dense_routing_is_the_alignment_of_every_token_on_every_shared_expert(M, n, block_m):
    ids, weights, (sorted_ids, tile_expert, num_tiles) = experts.dense_routing(M, n, block_m, torch.device("cpu"))
    assert torch.equal(ids, torch.arange(n, dtype=torch.int32).repeat(M, 1)) and bool((weights == 1).all())
    ref_ids, ref_tiles, ref_num = reference.align_pairs(ids, None, n, block_m)
    tiles = int(ref_num)
    assert int(num_tiles) == tiles == tile_expert.numel()
    assert torch.equal(tile_expert, ref_tiles[:tiles])
    assert torch.equal(sorted_ids, ref_ids[:tiles * block_m])
    cached = experts.dense_routing(M, n, block_m, torch.device("cpu"))[0] is ids
    assert cached == (M <= experts.DENSE_ROUTING_CACHE_MAX_M)  # decode sizes only: the cache stays small


def test_the_kernels_launch_runs_no_cublas_where_it_may_run_on_the_side_stream(monkeypatch):
    """cuBLAS allocates its workspace lazily per stream, which the side stream must not do (streams.py):
    the sigmoid gate's GEMV is made when the launch is built, and run() launches the expert kernels only."""
    spec = dsv3_like(shared_gate=True, dtype="float16", hidden_size=48, intermediate_size=24,
                     shared_intermediate_size=24)
    w = random_weights(spec)
    x = torch.randn(3, spec.hidden_size, dtype=torch.float16)
    job = SharedExpertOnExpertKernels(spec, x, None, None, w, in_fp8=False, deterministic=True)

    def no_cublas(*args, **kwargs):
        raise AssertionError("torch.mm in SharedExpertOnExpertKernels.run")

    monkeypatch.setattr(torch, "mm", no_cublas)
    job.run()
    monkeypatch.undo()
    torch.testing.assert_close(job.out, reference.shared_experts(spec, x, w).float(), rtol=2e-2, atol=2e-2)


def _fp8_shared_case(M, n_shared, device, seed):
    """An fp8 layer's shared expert of n_shared chunks and its fp8 input: DeepSeek-V3's sizes on a GPU."""
    H, I = (7168, 2048) if device == "cuda" else (256, 128)
    dtype = "bfloat16" if device == "cuda" else "float16"  # fp16 stands in for bf16 on the interpreter
    spec = dsv3_like(dtype=dtype, hidden_size=H, intermediate_size=I, shared_intermediate_size=I * n_shared,
                     quant="fp8_block")
    w = random_weights(spec, device=device, seed=seed)
    x = torch.randn(M, H, device=device).to(spec.torch_dtype)
    return spec, w, x, *reference.quantize_fp8_groups(x)


@pytest.mark.usefixtures("poisoned_expert_buffers")
@pytest.mark.parametrize("M,n_shared", [(1, 1), (3, 2), (16, 1)])
def test_one_wave_shared_expert_is_the_fp8_expert_launch(M, n_shared):
    """OneWaveSharedExpert's partial outputs add up to what the fp8 launch of the expert kernels makes (the
    same arithmetic; on a GPU the fp8 MMA's sums may flip an h quantisation step) and to the reference, with
    every buffer NaN-poisoned. Twice, so that the second launch finds the group counters the first left."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec, w, x, x_fp8, x_scale = _fp8_shared_case(M, n_shared, device, seed=M)
    splits = OneWaveSharedExpert.splits(spec, M, x.device)
    one_wave = OneWaveSharedExpert(spec, x, x_fp8, x_scale, w, splits)
    chain = SharedExpertOnExpertKernels(spec, x, x_fp8, x_scale, w, in_fp8=True, deterministic=True)
    chain.run()
    expected = reference.shared_experts_fp8(spec, x.double(), w)
    for _ in range(2):
        one_wave.run()
        got = one_wave.out.sum(0)
        assert torch.isfinite(one_wave.out).all()
        if device == "cuda":
            assert float((got - chain.out).norm() / chain.out.norm()) < 1e-2
        else:
            torch.testing.assert_close(got, chain.out, rtol=1e-5, atol=1e-5)
        assert float((got.double() - expected).norm() / expected.norm()) < 3e-2
    if device == "cuda":
        assert bool((one_wave.counters % (1 << 16) == 0).all())


def test_one_wave_shared_expert_takes_one_program_per_sm_at_most(monkeypatch):
    """DeepSeek-V3's fp8 shared expert on 132 SMs: 16 groups of h x 7 programs of 1024 W_down rows each;
    what the kernel cannot take (W_down ranges over 1024 rows, a gated shared expert, bf16, more than 16
    tokens) gets None."""
    monkeypatch.setattr(experts, "device_facts", lambda device: ("H100", 132))
    spec = dsv3_like(hidden_size=7168, intermediate_size=2048, shared_intermediate_size=2048, quant="fp8_block",
                     dtype="bfloat16")
    cuda = torch.device("cuda")
    assert OneWaveSharedExpert.splits(spec, 1, cuda) == 7
    assert OneWaveSharedExpert.splits(spec.replace(hidden_size=4096, shared_intermediate_size=4096), 1, cuda) == 4
    wide = spec.replace(shared_intermediate_size=4096)  # 32 groups: 4 programs each, 1792 rows, over 1024
    for other, m in [(wide, 1), (spec.replace(shared_gate=True), 1), (spec.replace(quant="none"), 1), (spec, 17)]:
        assert OneWaveSharedExpert.splits(other, m, cuda) is None
