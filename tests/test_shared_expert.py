import pytest
import torch

from moe_fusion.lowering import experts, reference, shared_expert, streams
from moe_fusion.lowering.expert_configs import ExpertConfig, GemmTiles
from moe_fusion.lowering.shared_expert import SharedExpertBuffers, SharedExpertOnExpertKernels, shared_expert_into

from moe_cases import DEVICE, dsv3_like, float64_weights, needs_kernels, random_weights, relative_error


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


@needs_kernels
def test_the_kernels_launch_runs_no_cublas_where_it_may_run_on_the_side_stream(monkeypatch):
    """cuBLAS allocates its workspace lazily per stream, which the side stream must not do (streams.py):
    the sigmoid gate's GEMV is made when the launch is built, and run() launches the expert kernels only."""
    spec = dsv3_like(shared_gate=True, dtype="float16", hidden_size=48, intermediate_size=24,
                     shared_intermediate_size=24)
    w = random_weights(spec, device=DEVICE)
    x = torch.randn(3, spec.hidden_size, dtype=torch.float16, device=DEVICE)
    job = SharedExpertOnExpertKernels(spec, x, None, None, w, in_fp8=False, deterministic=True)

    def no_cublas(*args, **kwargs):
        raise AssertionError("torch.mm in SharedExpertOnExpertKernels.run")

    monkeypatch.setattr(torch, "mm", no_cublas)
    job.run()
    monkeypatch.undo()
    torch.testing.assert_close(job.out, reference.shared_experts(spec, x, w).float(), rtol=2e-2, atol=2e-2)


_REAL_DENSE_ROUTING = experts.dense_routing


def _unreadable_dense_routing(M, n, block_m, device):
    """dense_routing whose alignment says "no tiles" (fresh tensors: the cache keeps the true ones): a
    kernel that read it would do no work."""
    ids, weights, (sorted_ids, tile_expert, num_tiles) = _REAL_DENSE_ROUTING(M, n, block_m, device)
    return ids, weights, (torch.full_like(sorted_ids, M * n), torch.zeros_like(tile_expert), torch.zeros_like(num_tiles))


# (M, shared experts, fp8, deterministic, GEMM1 split): 4-token tiles, so M = 5 and 9 span several
# tiles of each expert, the last one partial
COMPUTED_ALIGNMENT_CASES = [
    (1, 1, True, False, 2),
    (5, 2, True, True, 1),
    (9, 2, False, True, 2),
    (5, 1, False, False, 1),
]


@needs_kernels
@pytest.mark.parametrize("M,n,fp8,deterministic,split", COMPUTED_ALIGNMENT_CASES)
def test_the_shared_launch_computes_its_dense_alignment_instead_of_reading_it(M, n, fp8, deterministic, split,
                                                                              monkeypatch, poisoned_expert_buffers):
    """With COMPUTED_ALIGNMENT the GEMMs compute dense_routing's tiles (expert_tiles.work_tile): given an
    alignment that says "no tiles", the launch still gives the bits of the launch that reads the true one."""
    spec = dsv3_like(dtype="float16", hidden_size=48, intermediate_size=24, shared_intermediate_size=24 * n,
                     quant="fp8_block" if fp8 else "none")
    w = random_weights(spec, device=DEVICE, seed=M)
    x = torch.randn(M, spec.hidden_size, device=DEVICE).half()
    block_k = 128 if fp8 else 16
    config = ExpertConfig(4, GemmTiles(16, block_k, split_k=split, programs_per_sm=1, swap_ab=fp8),
                          GemmTiles(16, block_k, split_k=2, programs_per_sm=1, swap_ab=fp8))
    monkeypatch.setattr(experts, "shared_expert_config", lambda *args: config)

    def run(computed):
        monkeypatch.setattr(shared_expert, "COMPUTED_ALIGNMENT", computed)
        monkeypatch.setattr(experts, "dense_routing", _unreadable_dense_routing if computed else _REAL_DENSE_ROUTING)
        job = SharedExpertOnExpertKernels(spec, x, None, None, w, in_fp8=fp8, deterministic=deterministic)
        assert job.launch.dense_alignment == computed
        job.run()
        return job.out

    computed, read = run(True), run(False)
    expected = (reference.shared_experts_fp8 if fp8 else reference.shared_experts)(spec, x.double(), float64_weights(w))
    assert relative_error(computed, expected) < 2e-3
    if deterministic:
        assert torch.equal(computed, read)
    else:  # on a GPU the atomics' order varies from run to run
        torch.testing.assert_close(computed, read, rtol=1e-5, atol=1e-6)


def test_a_dense_alignment_refuses_a_shared_tail():
    """The computed dense alignment and a shared-expert tail would both claim the tiles past the routed ones."""
    with pytest.raises(ValueError, match="dense alignment"):
        experts.ExpertLaunch(x=None, pair_weights=None, topk_ids=None, experts=None, alignment=None,
                             weight_on_input=False, num_sms=1, shared=object(), dense_alignment=True)
