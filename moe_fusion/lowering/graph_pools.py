"""Tensors that outlive a call (caches of constants, re-armed counters) made where no CUDA-graph memory
pool takes them.

torch.compile(mode="reduce-overhead") warms each new graph up with an eager run whose allocations the
caching allocator routes to the graph's private pool (the current thread's, or the warm-up stream's in older
torch). A tensor cached during that run lives in the pool: the graph's next run may reuse its memory, and
the graph trees refuse it ("tensor(s) in the cudagraph pool not tracked as outputs"). Allocations of another
thread are not routed, so the tensors are made on a thread of their own, which waits for its kernels before
handing them over. Under a capture the callers make their tensors inline and do not keep them.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def made_outside_graph_pools(make: Callable[[], T], device: torch.device) -> T:
    """make() on a thread of its own on CUDA, finished on the GPU before it returns; inline elsewhere."""
    if device.type != "cuda":
        return make()
    made, failed = [], []

    def run() -> None:
        try:
            with torch.cuda.device(device):
                made.append(make())
                torch.cuda.current_stream(device).synchronize()
        except BaseException as e:  # handed to the caller's thread
            failed.append(e)

    worker = threading.Thread(target=run, name="moe_fusion-graph-pools")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]
