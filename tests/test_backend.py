import subprocess
import sys


def test_backend_resolves_by_name_without_importing_the_package():
    """The torch_dynamo_backends entry point makes backend="moe_fusion" work after pip install."""
    code = (
        "import sys, torch\n"
        "assert 'moe_fusion' not in sys.modules\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "backend = lookup_backend('moe_fusion')\n"
        "print(backend.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "moe_fusion.backend"


def test_mode_and_options_reach_inductor(monkeypatch):
    """torch.compile(backend="moe_fusion", mode=..., options=...) configures Inductor as
    backend="inductor" would (reduce-overhead: CUDA graphs), with the fusion pass added."""
    import torch
    import torch._inductor.compile_fx as compile_fx_module

    from moe_fusion.backend import MoEFusionBackend

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches, **kwargs):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    backend = MoEFusionBackend()
    model = torch.compile(lambda x: x * 2, backend=backend, mode="reduce-overhead",
                          options=None)
    assert torch.equal(model(torch.ones(3)), torch.full((3,), 2.0))
    assert seen["triton.cudagraphs"] is True
    assert seen["post_grad_custom_post_pass"] is not None

    seen.clear()
    torch._dynamo.reset()
    model = torch.compile(lambda x: x + 1, backend=backend, options={"max_autotune": True})
    model(torch.ones(3))
    assert seen["max_autotune"] is True and "triton.cudagraphs" not in seen
