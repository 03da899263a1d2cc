import sys, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_fusion.lowering.one_wave_mlp_kernel import one_wave_mlp_kernel as fn
warps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
stages = int(sys.argv[2]) if len(sys.argv) > 2 else 3
K_RANGE = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
ptrs = dict(xq_ptr="*fp8e4nv", xs_ptr="*fp32", wg_ptr="*fp8e4nv", wu_ptr="*fp8e4nv", wgs_ptr="*fp32", wus_ptr="*fp32",
            wd_ptr="*fp8e4nv", wds_ptr="*fp32", sums_ptr="*fp32", counter_ptr="*i32", out_ptr="*fp32", model_ptr="*bf16")
ints = ["M", "H", "stride_xm", "stride_xsm", "stride_wn", "stride_wsn", "stride_wdn", "stride_wdsn", "stride_og", "stride_om"]
BK = int(sys.argv[4]) if len(sys.argv) > 4 else 128
const = dict(SPLITS=7, K_RANGE=K_RANGE, BLOCK_M=16, BLOCK_K=BK, PHASE=0)
sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in const}}
names = list(fn.arg_names)
div = [k for k in names if k in ptrs or k in ("H", "stride_xm", "stride_wn", "stride_wdn", "stride_og", "stride_om")]
attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div}
src = ASTSource(fn, sig, const, attrs)
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
print("regs", k.n_regs if hasattr(k, "n_regs") else None, "spills", getattr(k, "n_spills", None), "shared", k.metadata.shared)
ptx = k.asm["ptx"]
print("local", len(re.findall(r"\.local", ptx)), "cp.async", ptx.count("cp.async.ca") + ptx.count("cp.async.cg"), "wgmma", ptx.count("wgmma.mma_async"), "mma.sync", ptx.count("mma.sync"), "ld.global", ptx.count("ld.global"))
open("/tmp/one_wave.ptx", "w").write(ptx); open("/tmp/one_wave.ttgir", "w").write(k.asm["ttgir"])
import subprocess
sass = k.asm.get("sass")
open("/tmp/one_wave.cubin", "wb").write(k.asm["cubin"])
bindir = __import__("os").path.dirname(triton.__file__) + "/backends/nvidia/bin"
out = subprocess.run([bindir + "/cuobjdump", "-res-usage", "/tmp/one_wave.cubin"], capture_output=True, text=True).stdout
print([l.strip() for l in out.splitlines() if "REG" in l])
