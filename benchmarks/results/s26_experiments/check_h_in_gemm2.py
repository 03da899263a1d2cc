"""Session 26: the fp8 shared expert with GEMM2 making h from the split GEMM1's sums (W8A16 down projection)
against its reference on the GPU, dsv3 shapes, bf16, M = 1 / 4 / 33, atomic and deterministic, h buffers
poisoned with NaN; and how far it is from the W8A8 expert (h quantised per 1x128 group). Needs
h_in_model_dtype_gemm2.patch applied (the code was reverted); call 2 ran it before the stages were capped, and its
M = 33 launch then asked for more shared memory than an SM has."""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "tests")
from moe_cases import dsv3_like, random_weights  # noqa: E402
from moe_fusion.lowering import experts, reference  # noqa: E402
from moe_fusion.lowering.shared_expert import SharedExpertOnExpertKernels  # noqa: E402


def w8a16_reference(x, w):
    wg, wu, wd = (reference.dequantize_fp8_blocks(*reference.quantize_fp8_blocks(t)).double()
                  for t in (w.shared_gate, w.shared_up, w.shared_down))
    xq = reference.fp8_round_trip(x).double()
    h = (F.silu(xq @ wg.T) * (xq @ wu.T)).to(x.dtype)
    return h.double() @ wd.T


spec = dsv3_like(dtype="bfloat16", hidden_size=7168, intermediate_size=2048, shared_intermediate_size=2048,
                 num_experts=4, top_k=2, n_group=2, topk_group=1, quant="fp8_block_quantize")
w = random_weights(spec, device="cuda")
run_spec, wq = experts.with_fp8_experts(spec, w)
failures = 0
for M in (1, 4, 33):
    for deterministic in (False, True):
        x = torch.randn(M, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
        x_fp8, x_scale = reference.quantize_fp8_groups(x)
        job = SharedExpertOnExpertKernels(run_spec, x, x_fp8, x_scale, wq, in_fp8=True, deterministic=deterministic,
                                         h_in_model_dtype=True)
        job.launch.h.fill_(float("nan"))
        job.launch.h_fp8.view(torch.uint8).fill_(0x7F)
        split = job.launch.gemm1_splits
        job.run()
        torch.cuda.synchronize()
        ref = w8a16_reference(x, w)
        w8a8 = reference.shared_experts_fp8(spec, x.double(), w).double()
        rel = ((job.out.double() - ref).norm() / ref.norm()).item()
        rel_w8a8 = ((w8a8 - ref).norm() / ref.norm()).item()
        ok = job.launch.widened_gemm2 and bool(torch.isfinite(job.out).all()) and rel < 2e-3
        failures += not ok
        print(f"M={M:3d} det={deterministic!s:5} gemm1 split {split} widened {job.launch.widened_gemm2!s:5} "
              f"rel err vs W8A16 ref {rel:.2e}  (W8A8 expert vs W8A16 ref {rel_w8a8:.2e})  {'ok' if ok else 'FAIL'}")
sys.exit(1 if failures else 0)
