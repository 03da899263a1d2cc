"""The shared expert as a dense gated MLP written into caller-provided buffers.

Writing into preallocated buffers is what lets it run on the side stream (see streams.py):
nothing here allocates. The GEMMs go to cuBLAS: at decode the shared expert is one dense MLP
whose weights are read once, which a library GEMV already does at bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import MoESpec, MoEWeights


@dataclass
class SharedExpertBuffers:
    gate: torch.Tensor  # [M, Is]
    up: torch.Tensor  # [M, Is]
    out: torch.Tensor  # [M, H], the shared expert's output (gated when the spec says so)
    gate_logit: torch.Tensor  # [M, 1]; unused without a shared-expert gate

    @staticmethod
    def allocate(spec: MoESpec, x: torch.Tensor) -> "SharedExpertBuffers":
        M = x.shape[0]
        Is = spec.shared_intermediate_size
        return SharedExpertBuffers(
            gate=x.new_empty((M, Is)),
            up=x.new_empty((M, Is)),
            out=x.new_empty((M, spec.hidden_size)),
            gate_logit=x.new_empty((M, 1)),
        )


def shared_expert_into(spec: MoESpec, x: torch.Tensor, w: MoEWeights, buffers: SharedExpertBuffers) -> None:
    """buffers.out = [sigmoid(x g^T) *] (silu(x Wg^T) * (x Wu^T)) Wd^T, without allocating."""
    torch.mm(x, w.shared_gate.t(), out=buffers.gate)
    torch.mm(x, w.shared_up.t(), out=buffers.up)
    torch.nn.functional.silu(buffers.gate, inplace=True)
    buffers.gate.mul_(buffers.up)
    torch.mm(buffers.gate, w.shared_down.t(), out=buffers.out)
    if spec.shared_gate:
        torch.mm(x, w.shared_expert_gate.t(), out=buffers.gate_logit)
        buffers.gate_logit.sigmoid_()
        buffers.out.mul_(buffers.gate_logit)
