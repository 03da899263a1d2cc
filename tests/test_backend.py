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
