import sys, torch
sys.path.insert(0, "tests")
from moe_fusion.lowering import layer
from test_layer import _expected, _rel_err
from moe_cases import dsv3_like, random_weights
layer.ONE_WAVE_SHARED_MAX_M = int(sys.argv[1])
layer.options.shared_fp8 = True
layer.options.shared_expert = "inline"
for M, n, ep in [(1, 1, True), (3, 2, False)]:
    spec = dsv3_like(dtype="float16", hidden_size=256, intermediate_size=128, shared_intermediate_size=128 * n,
                     quant="fp8_block", **(dict(num_local_experts=4) if ep else {}))
    w = random_weights(spec, seed=M)
    x = torch.randn(M, spec.hidden_size).half()
    plan = layer.plan_layer(spec, M, x.device)
    print(plan.shared_one_wave_splits, plan.shared_expert, plan.shared_fp8)
    got = layer.moe_layer(spec, x, w, plan)
    print(M, n, _rel_err(got, _expected(spec, x, w, plan)))
