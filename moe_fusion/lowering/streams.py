"""Fork/join of independent work onto a second CUDA stream, safe under CUDA-graph capture.

The side stream never allocates: CUDA-graph trees (``mode="reduce-overhead"``) cannot capture
allocations made on a side stream (pytorch/pytorch#151199), and memory allocated on one stream
and used on another needs ``record_stream`` bookkeeping. So the caller allocates every buffer
the side work writes on the current stream, before the fork; the join (current stream waits
for the side stream) happens before any of those buffers can be freed or reused.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

_side_streams: Dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def fork(device: torch.device, side: Callable[[], None], after: Optional[torch.cuda.Event] = None) -> None:
    """Queue ``side()`` on the side stream, after everything queued so far on the current stream, or with
    ``after`` (mark's event) only after what was queued before that mark."""
    other = side_stream(device)
    if after is None:
        other.wait_stream(torch.cuda.current_stream(device))
    else:
        other.wait_event(after)
    with torch.cuda.stream(other):
        side()


def mark(device: torch.device) -> torch.cuda.Event:
    """An event at this point of the current stream, for a later fork(after=...)."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def join(device: torch.device) -> None:
    """Make later work on the current stream wait for everything forked so far."""
    torch.cuda.current_stream(device).wait_stream(side_stream(device))
