"""The ``moe_fusion`` torch.compile backend: Inductor with the MoE fusion pass installed."""
from __future__ import annotations

import torch

from .passes.fusion_pass import MoEFusionPass


def moe_fusion_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    # Importing the ops registers them before the pass can emit calls to them.
    from . import ops  # noqa: F401

    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": MoEFusionPass()})
