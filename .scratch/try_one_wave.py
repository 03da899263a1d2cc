import os, torch, triton
os.environ.setdefault("TRITON_INTERPRET", "1")
from moe_fusion.lowering.one_wave_mlp_kernel import one_wave_mlp_kernel
from moe_fusion.lowering import reference as R
torch.manual_seed(0)
M, H, Is = 3, 512, 256
x = torch.randn(M, H, dtype=torch.bfloat16)
wg = torch.randn(Is, H, dtype=torch.bfloat16) * 0.05
wu = torch.randn(Is, H, dtype=torch.bfloat16) * 0.05
wd = torch.randn(H, Is, dtype=torch.bfloat16) * 0.05
qg, sg = R.quantize_fp8_blocks(wg); qu, su = R.quantize_fp8_blocks(wu); qd, sd = R.quantize_fp8_blocks(wd)
xq, xs = R.quantize_fp8_groups(x)
groups = Is // 128
splits = 2
K_RANGE = H // splits
sums = torch.full((groups, splits, M, 256), float("nan"))
out = torch.full((groups, M, H), float("nan"))
counter = torch.zeros(groups, dtype=torch.int32)
dbg = torch.zeros(groups, 16, 128, dtype=torch.float8_e4m3fn); dbgs = torch.zeros(groups, 16)
for phase in (1, 2):
    one_wave_mlp_kernel[(groups * splits,)](xq, xs, qg, qu, sg, su, qd, sd, sums, counter, out, x, M, H,
        xq.stride(0), xs.stride(0), qg.stride(0), sg.stride(0), qd.stride(0), sd.stride(0), out.stride(0), out.stride(1),
        SPLITS=splits, dbg_ptr=dbg, dbgs_ptr=dbgs, K_RANGE=K_RANGE, BLOCK_M=16, BLOCK_K=128, PHASE=phase)
y = out.sum(0)
ref = R._fp8_gated_mlp(x.double(), R.dequantize_fp8_blocks(qg, sg).double(), R.dequantize_fp8_blocks(qu, su).double(), R.dequantize_fp8_blocks(qd, sd).double())
print((y.double() - ref).abs().max().item(), ref.abs().max().item(), torch.isnan(out).any().item())
xq_d = R.fp8_round_trip(x.double()).double()
g = xq_d @ R.dequantize_fp8_blocks(qg, sg).double().T
u = xq_d @ R.dequantize_fp8_blocks(qu, su).double().T
h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16).float()
ref2 = R.fp8_round_trip(h).double() @ R.dequantize_fp8_blocks(qd, sd).double().T
print("vs bf16-h ref", (y.double() - ref2).abs().max().item())
gk = sums[..., :128].sum(1).permute(1, 0, 2).reshape(M, Is)
uk = sums[..., 128:].sum(1).permute(1, 0, 2).reshape(M, Is)
print("gate err", (gk.double() - g).abs().max().item(), g.abs().max().item(), "up err", (uk.double()-u).abs().max().item())
h3 = (gk * torch.sigmoid(gk) * uk).to(torch.bfloat16).float()
q3, s3 = R.quantize_fp8_groups(h3)
ref3 = R.dequantize_fp8_groups(q3, s3).double() @ R.dequantize_fp8_blocks(qd, sd).double().T
print("vs kernel-sums emulation", (y.double() - ref3).abs().max().item())
per_group = [(out[gi].double() - (R.dequantize_fp8_groups(q3, s3).double()[:, gi*128:(gi+1)*128] @ R.dequantize_fp8_blocks(qd, sd).double()[:, gi*128:(gi+1)*128].T)).abs().max().item() for gi in range(groups)]
print(per_group)
e = (R.dequantize_fp8_groups(q3, s3).double()[:, 0:128] @ R.dequantize_fp8_blocks(qd, sd).double()[:, 0:128].T)
d = (out[0].double() - e).abs()
print(d.max(dim=0).values.view(4, 128).max(1).values, d.max(1).values)
print(out[0][:, :4], e[:, :4])
hq = torch.cat([dbg[gi][:M] for gi in range(groups)], 1)
hs = dbgs[:, :M].T
print("q bits differ", (hq.view(torch.uint8) != q3.view(torch.uint8)).sum().item(), "scale err", (hs - s3).abs().max().item())
yk = R.dequantize_fp8_groups(hq, hs).double() @ R.dequantize_fp8_blocks(qd, sd).double().T
print("y vs emulation of its own h", (y.double() - yk).abs().max().item())
