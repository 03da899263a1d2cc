import sys, torch
sys.path.insert(0, "tests")
from moe_fusion.lowering import layer
from moe_cases import dsv3_like, random_weights
layer.options.shared_fp8 = True
layer.options.shared_expert = "inline"
M = 1
spec = dsv3_like(dtype="float16", hidden_size=256, intermediate_size=128, shared_intermediate_size=128, quant="fp8_block", num_local_experts=4)
w = random_weights(spec, seed=M)
x = torch.randn(M, spec.hidden_size).half()
outs = []
for on in (0, 16, 0):
    layer.ONE_WAVE_SHARED_MAX_M = on
    plan = layer.plan_layer(spec, M, x.device)
    outs.append(layer.moe_layer(spec, x, w, plan).float())
print((outs[0] - outs[1]).abs().max().item(), (outs[0] - outs[2]).abs().max().item(), outs[0].abs().max().item())
