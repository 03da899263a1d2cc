"""GPU timing as DESIGN.md prescribes: CUDA-graph replay, median of several batches of replays
after warm-up, inputs rotated so no timing reads a cache-resident copy; plus the copy-bandwidth
ceiling and a kernels-per-call count from the profiler."""
from __future__ import annotations

import statistics
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def graph_replay_us(fn: Callable, input_sets: Sequence[tuple], replays: int = 20, batches: int = 7) -> float:
    """Median µs of one ``fn(*inputs)`` call, timed as CUDA-graph replays.

    One graph holds one call per input set (rotating through them), so a replay of the graph
    is len(input_sets) calls on different inputs; the time per call is replay time / sets.
    """
    graph, _ = capture_calls(fn, input_sets)
    return replayed_call_us(graph, len(input_sets), replays, batches)


def capture_calls(fn: Callable, input_sets: Sequence[tuple],
                  pad_bytes: int = 0) -> Tuple[torch.cuda.CUDAGraph, List[Optional[int]]]:
    """A CUDA graph of one ``fn(*inputs)`` per input set, after a warm-up call of each (compilation,
    autotuning, allocator) on a side stream; and the address of each captured call's output (None where
    it returned no tensor). The outputs themselves are not kept, so each call's memory goes back to the
    graph's pool for the next one, as when nothing looks at them. ``pad_bytes`` of the pool are taken
    before the first call and held through the last, which moves where the calls' buffers lie."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for inputs in input_sets:
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pad = torch.empty(pad_bytes, dtype=torch.uint8, device="cuda")  # noqa: F841 (held through the calls)
        addresses = [_address(fn(*inputs)) for inputs in input_sets]
    return graph, addresses


def _address(output) -> Optional[int]:
    return output.data_ptr() if isinstance(output, torch.Tensor) else None


def replayed_call_us(graph: torch.cuda.CUDAGraph, calls: int, replays: int = 20, batches: int = 7) -> float:
    """Median over ``batches`` of the µs per call of ``replays`` replays of a graph of ``calls`` calls,
    after three replays of warm-up. Each batch starts behind one untimed replay, so the GPU is still busy
    when the host has launched the timed ones: the time is theirs back to back, not also the host's launch
    of the first (up to 0.2 µs per call with one replay of 32 layer calls a batch, session 30)."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * calls))
    return statistics.median(samples)


def copy_bandwidth_bytes_per_s(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_replay_us(lambda: dst.copy_(src), [()], replays=5, batches=5)
    return 2 * nbytes / (us * 1e-6)


def kernels_per_call(fn: Callable, inputs: tuple) -> int:
    """Number of GPU kernels one call launches (after warm-up), read off the profiler."""
    return len(kernel_names_per_call(fn, inputs))


def kernel_names_per_call(fn: Callable, inputs: tuple) -> List[str]:
    """The GPU kernels one call launches (after warm-up), in launch order, read off the profiler."""
    fn(*inputs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*inputs)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and _is_kernel(e.name)]
    return [e.name for e in sorted(kernels, key=lambda e: e.time_range.start)]


def _is_kernel(name: str) -> bool:
    return not name.startswith(("Memcpy", "Memset", "cudaMemcpy", "cudaMemset"))
