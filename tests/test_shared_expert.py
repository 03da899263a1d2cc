import pytest
import torch

from moe_fusion.lowering import experts, reference, streams
from moe_fusion.lowering.expert_configs import ExpertConfig, GemmTiles
from moe_fusion.lowering.shared_expert import SharedExpertBuffers, shared_expert_into
from moe_fusion.spec import FP8_DTYPE

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
    spec = dsv3_like(shared_gate=True, dtype="bfloat16")
    w = random_weights(spec, device="cuda")
    x = torch.randn(7, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    buffers = _poisoned(spec, x)
    expected = reference.shared_experts(spec, x, w)

    def step():
        streams.fork(x.device, lambda: shared_expert_into(spec, x, w, buffers))
        doubled = x * 2
        streams.join(x.device)
        return doubled

    step()  # warm-up outside capture (cuBLAS workspaces, side stream creation)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    buffers.out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        doubled = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(buffers.out, expected, rtol=2e-2, atol=2e-2)
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


class _LaunchRecorder:
    """Stands in for a Triton kernel: records (grid, args, constexprs) of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("M", [1, 4, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("gemm1", [dict(block_n=64, split_k=4, programs_per_sm=1),  # the H100's dsv3-shared M = 1
                                   dict(block_n=32, split_k=1, programs_per_sm=2)])
def test_gemm1_weight_prefetch_covers_the_first_wave_within_its_budget(M, dtype, gemm1, monkeypatch):
    """The prefetch's grid is GEMM1's first wave, and the lines it asks for (a power of 2 per row,
    gate and up) stay within the byte budget; a budget below one line per row launches nothing."""
    H, I, sms = 7168, 2048, 132
    g = GemmTiles(block_k=128, num_stages=4, num_warps=4, **gemm1)
    config = ExpertConfig(16, g, g)
    shared = experts.ExpertTensors(torch.empty(1, I, H, dtype=dtype), torch.empty(1, I, H, dtype=dtype),
                                   torch.empty(1, H, I, dtype=dtype))
    _, _, alignment = experts.dense_routing(M, 1, config.block_m, torch.device("cpu"))
    wave = experts.gemm1_grid(alignment[1].numel(), I, g, sms)
    row_bytes = experts.ExpertLaunch._k_per_split(g, H) * shared.w_gate.element_size()
    one_line_per_row = wave * 2 * g.block_n * 128
    recorder = _LaunchRecorder()
    monkeypatch.setattr(experts, "gemm1_prefetch_kernel", recorder)
    for budget in (one_line_per_row - 1, one_line_per_row, 6 << 20, 1 << 40):
        recorder.launches.clear()
        experts.prefetch_gemm1_weights(shared, alignment, config, H, sms, budget)
        if budget < one_line_per_row:
            assert recorder.launches == []
            continue
        [(grid, _, constants)] = recorder.launches
        lines = constants["PREFETCH_LINES"]
        assert grid == (wave,) and lines & (lines - 1) == 0
        assert wave * 2 * g.block_n * lines * 128 <= budget
        assert lines * 128 <= row_bytes  # never past a row's K split


def test_weight_prefetch_is_cuda_only_and_can_be_turned_off(monkeypatch):
    from moe_fusion.lowering import shared_expert
    spec = dsv3_like()
    w = random_weights(spec)
    assert shared_expert.weight_prefetch(spec, w, 4, torch.device("cpu"), False) is None
    monkeypatch.setattr(shared_expert, "PREFETCH_BYTES", 0)
    assert shared_expert.weight_prefetch(spec, w, 4, torch.device("cuda"), False) is None
