"""moe_fusion: find the Mixture-of-Experts layers of a PyTorch model under torch.compile and run
them as fused Triton kernels.

    model = torch.compile(model, backend="moe_fusion")
    moe_fusion.last_report()      # what was matched, per layer
"""
from . import ops  # noqa: F401  (registers torch.ops.moe_fusion.*)
from .backend import MoEFusionBackend, install, installed, last_report, uninstall
from .spec import MoESpec, MoEWeights, SpecError

__all__ = ["MoESpec", "MoEWeights", "SpecError", "MoEFusionBackend", "install", "installed", "last_report",
           "uninstall"]
