"""The SM-residency arithmetic of expert_configs (what a GEMM program holds of an SM's shared memory) and the
layer plan's routed tiles shortened to fit beside the side stream's shared-expert launch.

The estimate is checked against Triton's own sm_90 compile of the expert GEMMs, made on this machine without a
GPU (Triton ships ptxas): a pipeline stage or operand the estimate left out moves it by kilobytes.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from moe_fusion.lowering import expert_configs, experts, layer
from moe_fusion.lowering.expert_configs import GemmTiles
from moe_fusion.spec import MoESpec

H100 = "NVIDIA H100 80GB HBM3"
SM90_COMPILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")


def sm90_shared_bytes(cases) -> list:
    """Shared memory per program of Triton's sm_90 compile of an fp8 expert GEMM at each (gemm1, block_m, tiles),
    in a process of its own: the kernels compile only where the interpreter (conftest, without CUDA) is off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [json.dumps([[gemm1, block_m, dataclasses.asdict(g)] for gemm1, block_m, g in cases])]
    done = subprocess.run([sys.executable, SM90_COMPILE, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_program_shared_bytes_bounds_the_sm90_compile():
    cases = [
        (True, 16, GemmTiles(64, 256, 4, 3, 2, 4, swap_ab=True)),  # dsv3-ep8 fp8's routed GEMM1 at M = 1
        (True, 16, GemmTiles(64, 128, 4, 4, 1, 4, swap_ab=True)),  # the fp8 shared expert's GEMM1 at M = 1
        (False, 16, GemmTiles(128, 128, 4, 4, 2, 4, swap_ab=True)),  # the routed GEMM2 at M = 1
        (False, 16, GemmTiles(64, 128, 4, 3, 2, 2, swap_ab=True)),
        (False, 32, GemmTiles(128, 256, 4, 3, 2, 2, swap_ab=True)),
    ]
    for (gemm1, block_m, g), shared in zip(cases, sm90_shared_bytes(cases)):
        compiled = shared + expert_configs.PROGRAM_RESERVED_BYTES
        estimate = expert_configs.program_shared_bytes(block_m, g, gemm1, element_bytes=1)
        assert compiled <= estimate <= compiled + expert_configs.PIPELINE_EXTRA_BYTES, (gemm1, block_m, g, shared)


def test_programs_on_busiest_sm_follow_the_persistent_grid():
    g = GemmTiles(64, 128, programs_per_sm=2)
    assert expert_configs.programs_on_busiest_sm(128, g, 132) == 1
    assert expert_configs.programs_on_busiest_sm(224, g, 132) == 2
    assert expert_configs.programs_on_busiest_sm(10_000, g, 132) == 2
    assert expert_configs.programs_on_busiest_sm(0, g, 132) == 1


def test_pipeline_within_shortens_stages_then_k_steps():
    per_program = lambda t: expert_configs.program_shared_bytes(16, t, False, 1)  # noqa: E731
    g = GemmTiles(128, 256, 4, 4, 2)
    assert expert_configs.pipeline_within(g, 16, False, 1, 2 * per_program(g)) == g
    room = 2 * per_program(GemmTiles(128, 256, 4, 3, 2)) - 1  # 3 stages of 256 do not fit; 3 of 128 do
    assert expert_configs.pipeline_within(g, 16, False, 1, room) == GemmTiles(128, 128, 4, 3, 2)
    two_stages = 2 * per_program(GemmTiles(128, 128, 4, 2, 2))
    assert expert_configs.pipeline_within(g, 16, False, 1, two_stages) == GemmTiles(128, 128, 4, 2, 2)
    assert expert_configs.pipeline_within(g, 16, False, 1, two_stages - 1) == g  # nothing fits: unchanged


def _dsv3_ep8_fp8() -> MoESpec:
    return MoESpec(hidden_size=7168, num_experts=256, top_k=8, intermediate_size=2048, num_local_experts=32,
                   scoring="sigmoid", correction_bias=True, n_group=8, topk_group=4, shared_intermediate_size=2048,
                   quant="fp8_block", dtype="bfloat16")


@pytest.fixture
def on_an_h100(monkeypatch):
    """Table lookups as on the H100 the tables were tuned on (no GPU is needed to read them)."""
    monkeypatch.setattr(experts, "device_facts", lambda device: (H100, 132))


def test_routed_tiles_fit_beside_the_fp8_shared_expert(on_an_h100):
    spec = _dsv3_ep8_fp8()
    device = torch.device("cpu")
    for m in (1, 4):
        routed = experts.expert_config(spec, m, device)
        fitted = layer._routed_tiles_beside_shared(spec, routed, m, device, shared_fp8=True)
        shared = experts.shared_expert_config(spec, m, device)
        assert fitted.block_m == routed.block_m
        for gemm1, width, mine, theirs, tuned in ((True, 2048, fitted.gemm1, shared.gemm1, routed.gemm1),
                                                  (False, 7168, fitted.gemm2, shared.gemm2, routed.gemm2)):
            items = triton.cdiv(m, shared.block_m) * triton.cdiv(width, theirs.block_n) * theirs.split_k
            held = (expert_configs.programs_on_busiest_sm(items, theirs, 132)
                    * expert_configs.program_shared_bytes(shared.block_m, theirs, gemm1, 1))
            own = mine.programs_per_sm * expert_configs.program_shared_bytes(fitted.block_m, mine, gemm1, 1)
            tuned_own = tuned.programs_per_sm * expert_configs.program_shared_bytes(routed.block_m, tuned, gemm1, 1)
            assert tuned_own + held > expert_configs.SM_SHARED_BYTES  # the tuned tiles did not fit beside it
            assert own + held <= expert_configs.SM_SHARED_BYTES
            assert (mine.block_n, mine.split_k, mine.programs_per_sm, mine.swap_ab) == \
                (tuned.block_n, tuned.split_k, tuned.programs_per_sm, tuned.swap_ab)


def test_the_plan_fits_routed_tiles_only_beside_a_side_stream(on_an_h100, monkeypatch):
    spec = _dsv3_ep8_fp8()
    calls = []
    monkeypatch.setattr(layer, "_routed_tiles_beside_shared", lambda *a: calls.append(a) or a[1])
    layer.plan_layer(spec, 1, torch.device("cpu"))  # no second stream on the CPU: the shared expert inline
    assert calls == []
