"""Tensors that outlive a call (caches of constants, re-armed counters) made where no CUDA-graph memory
pool takes them.

torch.compile(mode="reduce-overhead") warms each new graph up with an eager run whose allocations the
caching allocator routes to the graph's private pool (the current thread's, since torch 2.8). A tensor cached
during that run lives in the pool: the graph's next run may reuse its memory, and the graph trees refuse it
("tensor(s) in the cudagraph pool not tracked as outputs"). Allocations of another thread are not routed
(torch.cuda.use_mem_pool says as much of threads it spawns), so the tensors are made on a thread of their own,
which waits for its kernels before handing them over. Under a capture the callers make their tensors inline
and do not keep them.
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

    def make_and_wait() -> T:
        with torch.cuda.device(device):
            made = make()
            torch.cuda.current_stream(device).synchronize()
        return made

    return on_own_thread(make_and_wait)


def on_own_thread(fn: Callable[[], T]) -> T:
    """fn() run on a new thread, its result or its exception handed back to this one."""
    made, failed = [], []

    def run() -> None:
        try:
            made.append(fn())
        except BaseException as e:
            failed.append(e)

    worker = threading.Thread(target=run, name="moe_fusion-graph-pools")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]
