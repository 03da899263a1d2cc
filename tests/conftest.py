import os

import pytest
import torch

# Without a GPU the Triton kernels run through the interpreter. triton.jit picks the mode when a
# kernel module is imported, so it is decided here, before any test module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    # GPU tests are skipped only where there is no CUDA device, never silently elsewhere.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def poisoned_expert_buffers(monkeypatch):
    """Every buffer the expert launches allocate starts as NaN: an element a kernel leaves unwritten shows."""
    from moe_fusion.lowering import experts

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(experts, "_buffer", poisoned)
