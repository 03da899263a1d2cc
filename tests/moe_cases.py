"""Random MoE layers for tests: a spec plus fresh random weights (never zeros) in canonical form; the
marker of tests that launch the Triton kernels and their device; the relative error they are held to."""
from __future__ import annotations

import os

import pytest
import torch

from moe_fusion.lowering import reference
from moe_fusion.spec import FP8_DTYPE, MoESpec, MoEWeights

# The kernels run compiled on a CUDA device or, on the CPU, under the Triton interpreter.
needs_kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                   reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where those tests put their tensors


def dsv3_like(**changes) -> MoESpec:
    base = dict(
        hidden_size=64, num_experts=16, top_k=4, intermediate_size=32, rms_norm=True, router_fp32=True,
        scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2, renormalize=True,
        renormalize_eps=1e-20, routed_scaling_factor=2.5, shared_intermediate_size=32, dtype="float32",
    )
    base.update(changes)
    return MoESpec(**base)


def random_weights(spec: MoESpec, device="cpu", seed=0) -> MoEWeights:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = spec.torch_dtype
    E, H, I, Is = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.shared_intermediate_size

    def mat(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dt).to(device)

    w = MoEWeights(router_weight=mat(spec.num_experts, H), w_gate=mat(E, I, H), w_up=mat(E, I, H), w_down=mat(E, H, I))
    if spec.rms_norm:
        w.norm_weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dt).to(device)
    if spec.correction_bias:
        w.correction_bias = (0.1 * torch.randn(spec.num_experts, generator=g)).to(device)
    if spec.fp8:
        w.w_gate, w.w_gate_scale = reference.quantize_fp8_blocks(w.w_gate)
        w.w_up, w.w_up_scale = reference.quantize_fp8_blocks(w.w_up)
        w.w_down, w.w_down_scale = reference.quantize_fp8_blocks(w.w_down)
    if spec.has_shared_experts:
        w.shared_gate, w.shared_up, w.shared_down = mat(Is, H), mat(Is, H), mat(H, Is)
    if spec.shared_gate:
        w.shared_expert_gate = mat(1, H)
    if spec.expert_parallel:
        # This rank owns every (E_global / E_local)-th expert, so local experts are scattered.
        stride = spec.num_experts // spec.num_local_experts
        expert_map = torch.full((spec.num_experts,), -1, dtype=torch.int32)
        expert_map[torch.arange(spec.num_local_experts) * stride] = torch.arange(spec.num_local_experts, dtype=torch.int32)
        w.expert_map = expert_map.to(device)
    return w


def float64_weights(w: MoEWeights) -> MoEWeights:
    """``w`` with every floating-point weight but fp8 ones in float64, for the references' expected outputs."""
    return MoEWeights(**{f: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                             and t.dtype != FP8_DTYPE else t) for f, t in vars(w).items()})


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| in float64, once every element of got is finite (written)."""
    got, expected = got.double(), expected.double()
    assert torch.isfinite(got).all(), "an output element was not written (or is not finite)"
    return float((got - expected).norm() / expected.norm())
