"""The shared expert computed apart from the routed experts, into buffers allocated beforehand.

Writing into preallocated buffers is what lets it run on the side stream (see streams.py):
nothing run() does allocates. Two ways: cuBLAS in the model dtype (a dense MLP whose weights are
read once, which a library GEMV does at bandwidth), or a launch of the expert kernels of its
own: in the model dtype (a persistent grid, where cuBLAS's split-K programs would hold the SMs
the routing chain needs), or, with fp8 experts, in fp8, reading half the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..spec import MoESpec, MoEWeights
from . import experts

# The kernels compute the dense alignment instead of reading it: on the 0-hit chain of dsv3-ep8 at
# M = 1 (the shared expert alone) each GEMM's first weight request waited two round trips for it.
# dsv3-ep8 fp8 by hit count, two H100s: 0.3 / 0.7 us faster at M = 1, 0.7 at M = 4 (session 27).
COMPUTED_ALIGNMENT = True


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
        _sigmoid_gate_into(x, w.shared_expert_gate, buffers.gate_logit)
        buffers.out.mul_(buffers.gate_logit)


def _sigmoid_gate_into(x: torch.Tensor, gate_weight: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, 1] = sigmoid(x gate_weight^T) in x's dtype (gate_weight [1, H]), without allocating."""
    torch.mm(x, gate_weight.t(), out=out)
    out.sigmoid_()


class CublasSharedExpert:
    """The shared expert in the model dtype on cuBLAS (shared_expert_into): buffers allocated by
    the constructor on the current stream, so that run() may go to the side stream."""

    def __init__(self, spec: MoESpec, normed: torch.Tensor, w: MoEWeights):
        self.spec, self.normed, self.w = spec, normed, w
        self.buffers = SharedExpertBuffers.allocate(spec, normed)

    def run(self) -> None:
        shared_expert_into(self.spec, self.normed, self.w, self.buffers)

    @property
    def out(self) -> torch.Tensor:
        return self.buffers.out


class SharedExpertOnExpertKernels:
    """The shared experts as a launch of their own on the routed-expert kernels: the n chunks of
    experts.shared_tail as n experts that every token selects with weight 1 or its sigmoid gate.
    In the model dtype, or with ``in_fp8`` (fp8 experts) in fp8 (reference.shared_experts_fp8) from
    the pre-quantised x the norm made. Its tiles are those tuned for this dense problem
    (experts.shared_expert_config), not the routed experts'. Buffers are allocated, and the sigmoid
    gate computed, by the constructor on the current stream, so that run() may go to the side stream,
    where it launches the expert kernels only; ``out`` is fp32 [M, H]."""

    def __init__(self, spec: MoESpec, normed: torch.Tensor, x_fp8: Optional[torch.Tensor],
                 x_scale: Optional[torch.Tensor], w: MoEWeights, in_fp8: bool, deterministic: bool):
        launch_spec = spec if in_fp8 else spec.replace(quant="none")
        tail = experts.shared_tail(launch_spec, w)
        M, n = normed.shape[0], tail.count
        config = experts.shared_expert_config(launch_spec, M, normed.device)
        ids, ones, alignment = experts.dense_routing(M, n, config.block_m, normed.device)
        self.config = config
        if spec.shared_gate:
            # The gate is a cuBLAS GEMV: made here, on the stream that builds the launch, since cuBLAS
            # would allocate its workspace on the side stream that run() may go to (streams.py).
            gate_logit = normed.new_empty((M, 1))
            _sigmoid_gate_into(normed, w.shared_expert_gate, gate_logit)
            self.weights = gate_logit.float().expand(M, n).contiguous()
        else:
            self.weights = ones
        self.launch = experts.ExpertLaunch(
            x=normed, pair_weights=self.weights.view(-1), topk_ids=ids, experts=tail.experts, alignment=alignment,
            weight_on_input=False, num_sms=experts.device_facts(normed.device)[1],
            pdl=experts.pdl_mode(normed.device, M, "shared"), on_side_stream=True,
            dense_alignment=COMPUTED_ALIGNMENT,
        )
        self.launch.allocate(config, deterministic, torch.float32)
        given = in_fp8 and x_fp8 is not None and x_fp8.numel() > 0
        self.launch.quantize_input(x_fp8 if given else None, x_scale if given else None)

    def run(self) -> None:
        self.run_gemm1()
        self.run_gemm2()

    def run_gemm1(self) -> None:
        """GEMM1 and what makes GEMM2's input (h)."""
        self.launch.gemm1(self.config)
        self.launch.prepare_h()

    def run_gemm2(self) -> None:
        self.launch.gemm2(self.config)
        self.out = self.launch.finalize()
