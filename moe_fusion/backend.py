"""The ``moe_fusion`` torch.compile backend: Inductor with the MoE fusion pass installed.

    torch.compile(model, backend="moe_fusion")          # the default backend instance
    torch.compile(model, backend="moe_fusion", mode="reduce-overhead")  # + CUDA graphs, as Inductor
    backend = MoEFusionBackend(); torch.compile(model, backend=backend); backend.report
    moe_fusion.install()                                 # keep backend="inductor", add the pass

Every compile appends what the pass matched to a ``MatchReport`` (``last_report()`` for the
default backend)."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .passes.fusion_pass import MoEFusionPass
from .passes.graph_utils import reset_example_inputs, set_example_inputs
from .passes.report import MatchReport


class _ChainedPass(CustomGraphPass):
    """Runs a pass that was already configured, then ours (config fields hold a single pass on
    older torch versions)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, graph):
        self.first(graph)
        self.second(graph)

    def uuid(self):
        first = self.first.uuid() if hasattr(self.first, "uuid") else None
        return None if first is None else f"{first}+{self.second.uuid()}"


def _with_existing(ours, existing):
    if existing is None:
        return ours
    if isinstance(existing, (list, tuple)):
        return type(existing)(list(existing) + [ours])
    return _ChainedPass(existing, ours)


def _capture_compile(gm, example_inputs, graph_modules, **kwargs):
    """Inductor's inner compile without code generation: the post-grad passes (ours included)
    run and the rewritten ATen graph runs eagerly. Matching tests use it to skip codegen."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import _recursive_post_grad_passes
    from torch._inductor.virtualized import V

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    with V.set_fake_mode(fake_mode):
        _recursive_post_grad_passes(gm, kwargs.get("is_inference", False))
    gm.recompile()
    graph_modules.append(gm)
    return make_boxed_func(gm.forward)


# torch.compile(model, backend="moe_fusion", options={FP8_EXPERTS_OPTION: True}): routed experts in
# fp8 on a bf16/fp16 model (MoEFusionPass.fp8_experts).
FP8_EXPERTS_OPTION = "moe_fusion.fp8_experts"


class MoEFusionBackend:
    """A torch.compile backend: Inductor plus the MoE fusion pass.

    codegen=False stops after the post-grad passes and runs the rewritten graph eagerly (fast,
    for matching tests and ``moe-fusion inspect``); keep_graphs records each layer's nodes before
    and after the rewrite. Inductor's FX graph and AOT autograd caches are bypassed so that every
    compile runs the pass and produces its report. fp8_experts: matched layers with bf16/fp16
    experts run them in fp8 (128x128 blocks, quantised once from the model's weights and cached:
    MoESpec quant "fp8_block_quantize"); one compile can also ask with options={FP8_EXPERTS_OPTION: True}."""

    def __init__(self, codegen: bool = True, keep_graphs: bool = False, report: Optional[MatchReport] = None,
                 fp8_experts: bool = False):
        self.codegen = codegen
        self.report = report if report is not None else MatchReport()
        self.fusion_pass = MoEFusionPass(self.report, keep_graphs=keep_graphs, fp8_experts=fp8_experts)
        self.graph_modules = []  # codegen=False: the rewritten post-grad graphs, as they run

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None):
        """``mode`` and ``options`` mean what they mean for backend="inductor", but for the option
        FP8_EXPERTS_OPTION, which is this compile's fp8_experts (see the constructor's)."""
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        from . import ops  # noqa: F401  (registers the ops the pass emits)

        options = dict(options or {})
        fp8_experts = options.pop(FP8_EXPERTS_OPTION, self.fusion_pass.fp8_experts)
        patches = {
            **inductor_mode_patches(mode, options),
            "post_grad_custom_post_pass": _with_existing(self.fusion_pass, inductor_config.post_grad_custom_post_pass),
            "fx_graph_cache": False,
        }
        extra = {} if self.codegen else {
            "inner_compile": functools.partial(_capture_compile, graph_modules=self.graph_modules)}
        token = set_example_inputs(list(example_inputs))
        default_fp8, self.fusion_pass.fp8_experts = self.fusion_pass.fp8_experts, fp8_experts
        try:
            with _autograd_cache_disabled():
                return compile_fx(gm, example_inputs, config_patches=patches, **extra)
        finally:
            self.fusion_pass.fp8_experts = default_fp8
            reset_example_inputs(token)


def inductor_mode_patches(mode: Optional[str], options: Optional[dict]) -> dict:
    """The Inductor config torch.compile(mode=..., options=...) selects for backend="inductor"."""
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode else {}), **(options or {})}


@contextlib.contextmanager
def _autograd_cache_disabled():
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        with functorch_config.patch(enable_autograd_cache=False):
            yield
    else:
        yield


_default_backend = MoEFusionBackend()


def moe_fusion_backend(gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                       options: Optional[dict] = None):
    """The entry point behind backend="moe_fusion"."""
    return _default_backend(gm, example_inputs, mode=mode, options=options)


def last_report() -> MatchReport:
    """What the pass matched in every compile through backend="moe_fusion" or ``install()``."""
    return _default_backend.report


_installed = []


def install(specialize_floats: bool = True) -> MoEFusionPass:
    """Add the pass to Inductor itself, for users who keep backend="inductor".

    Float module attributes (an RMSNorm eps, a routed scaling factor) must be compile-time
    constants for the spec; backend="moe_fusion" reads them from the example inputs, while here
    Dynamo is asked to specialize floats (set ``specialize_floats=False`` to leave Dynamo alone:
    layers whose constants arrive as graph inputs are then reported as not matched). Caches stay on:
    a compile served from Inductor's cache does not run the pass and adds nothing to the report."""
    from torch._inductor import config as inductor_config

    from . import ops  # noqa: F401

    if _installed:
        return _installed[0][0]
    previous = (inductor_config.post_grad_custom_post_pass, torch._dynamo.config.specialize_float)
    ours = MoEFusionPass(_default_backend.report)
    inductor_config.post_grad_custom_post_pass = _with_existing(ours, previous[0])
    if specialize_floats:
        torch._dynamo.config.specialize_float = True
    _installed.append((ours, previous))
    return ours


def uninstall() -> None:
    from torch._inductor import config as inductor_config

    if not _installed:
        return
    _, (custom_pass, specialize_float) = _installed.pop()
    inductor_config.post_grad_custom_post_pass = custom_pass
    torch._dynamo.config.specialize_float = specialize_float


@contextlib.contextmanager
def installed(specialize_floats: bool = True):
    """``with moe_fusion.installed(): torch.compile(model)(x)``"""
    install(specialize_floats)
    try:
        yield last_report()
    finally:
        uninstall()
