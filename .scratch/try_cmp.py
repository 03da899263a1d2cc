import sys, torch
sys.path.insert(0, "tests")
from moe_fusion.lowering import reference as R
from moe_fusion.lowering.shared_expert import OneWaveSharedExpert, SharedExpertOnExpertKernels
from moe_cases import dsv3_like, random_weights
for M, n in [(1, 1), (3, 2), (1, 2)]:
    spec = dsv3_like(dtype="float16", hidden_size=256, intermediate_size=128, shared_intermediate_size=128 * n, quant="fp8_block")
    w = random_weights(spec, seed=M)
    x = torch.randn(M, spec.hidden_size).half()
    xq, xs = R.quantize_fp8_groups(x)
    a = OneWaveSharedExpert(spec, x, xq, xs, w, OneWaveSharedExpert.splits(spec, M, x.device)); a.run()
    b = SharedExpertOnExpertKernels(spec, x, xq, xs, w, True, True); b.run()
    ref = R.shared_experts_fp8(spec, x.double(), R.MoEWeights(**{k: (v.double() if isinstance(v, torch.Tensor) and v.dtype in (torch.float16,) else v) for k, v in vars(w).items()})) if hasattr(R, "MoEWeights") else None
    ya = a.out.sum(0); yb = b.out
    print(M, n, (ya - yb).abs().max().item(), yb.abs().max().item())
