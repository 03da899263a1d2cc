"""moe_fusion: find the Mixture-of-Experts layers of a PyTorch model under torch.compile and run
them as fused Triton kernels.

    model = torch.compile(model, backend="moe_fusion")
"""
from . import ops  # noqa: F401  (registers torch.ops.moe_fusion.*)
from .spec import MoESpec, MoEWeights, SpecError

__all__ = ["MoESpec", "MoEWeights", "SpecError"]
