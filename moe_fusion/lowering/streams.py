"""Fork/join of independent work onto a second CUDA stream, safe under CUDA-graph capture.

The side stream never allocates: CUDA-graph trees (``mode="reduce-overhead"``) cannot capture
allocations made on a side stream (pytorch/pytorch#151199), and memory allocated on one stream
and used on another needs ``record_stream`` bookkeeping. So the caller allocates every buffer
the side work writes on the current stream, before the fork; the join (current stream waits
for the side stream) happens before any of those buffers can be freed or reused.
"""
from __future__ import annotations

from typing import Callable, Dict, TypeVar

import torch

T = TypeVar("T")

_side_streams: Dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def overlapped(device: torch.device, side: Callable[[], None], main: Callable[[], T]) -> T:
    """Run ``side()`` on the side stream while ``main()`` runs on the current stream; return main's
    result once both are done (in stream order: later work on the current stream sees both)."""
    current = torch.cuda.current_stream(device)
    other = side_stream(device)
    other.wait_stream(current)  # the side work's inputs were produced on the current stream
    with torch.cuda.stream(other):
        side()
    result = main()
    current.wait_stream(other)
    return result
