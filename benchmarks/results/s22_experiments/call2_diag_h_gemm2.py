"""Session 22: why test_layer_on_gpu[True-dsv3-ep8-fp8-from-bf16-*] fails under EXPERT_PDL=h+gemm2.
Per spec, mode, deterministic and M: the relative error against the test's reference, and whether 30
repeated calls are bitwise equal to the first."""
import sys
import torch
sys.path.insert(0, "tests")
from test_layer import GPU_SPECS, _expected, _rel_err
from moe_cases import random_weights
from moe_fusion.lowering import experts, layer

for name in ("dsv3-ep8-fp8", "dsv3-ep8-fp8-from-bf16"):
    spec = GPU_SPECS[name]
    for det in (False, True):
        for mode in ("h", "h+gemm2", "off"):
            experts.EXPERT_PDL = mode
            layer.options.deterministic = det
            layer.options.shared_expert = "inline"
            torch.manual_seed(0)
            w = random_weights(spec, device="cuda")
            for M in (1, 4, 33):
                x = torch.randn(M, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
                plan = layer.plan_layer(spec, M, x.device)
                got = layer.moe_layer(spec, x, w, plan).clone()
                torch.cuda.synchronize()
                err = _rel_err(got, _expected(spec, x, w, plan))
                same = sum(torch.equal(layer.moe_layer(spec, x, w, plan), got) for _ in range(30))
                torch.cuda.synchronize()
                print(f"{name:24s} det={det!s:5s} {mode:8s} M={M:2d} rel_err={err:.4f} bitwise_same={same}/30 "
                      f"split1={plan.expert_config.gemm1.split_k} split2={plan.expert_config.gemm2.split_k}", flush=True)
