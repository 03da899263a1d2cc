"""Does cuBLAS on a second stream that joins a CUDA-graph capture leave a dangling workspace after the
graph is destroyed (torch 2.11)? Eager side-stream GEMM after each destroyed graph; a filler tensor made
after the destruction is checked for being overwritten, and the GEMM result against a fresh one."""
import sys
import torch
torch.manual_seed(0)
dev = "cuda"
side = torch.cuda.Stream()
x = torch.randn(4, 7168, device=dev, dtype=torch.bfloat16)
w = torch.randn(2048, 7168, device=dev, dtype=torch.bfloat16) / 85
out = torch.empty(4, 2048, device=dev, dtype=torch.bfloat16)
expected = torch.mm(x, w.t())
warm = sys.argv[1] == "warm" if len(sys.argv) > 1 else True


def side_mm():
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.mm(x, w.t(), out=out)
    torch.cuda.current_stream().wait_stream(side)


if warm:
    side_mm(); torch.cuda.synchronize()
bad = 0
for i in range(12):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        side_mm()
    g.replay(); torch.cuda.synchronize()
    del g
    torch.cuda.empty_cache()
    filler = torch.full((64 << 20,), 7.0, device=dev)  # 256 MB, likely over the freed pool
    try:
        for _ in range(4):
            side_mm()
        torch.cuda.synchronize()
    except Exception as e:
        print(f"round {i}: CRASH {repr(e)[:160]}"); sys.exit(1)
    wrong = (filler != 7.0).sum().item()
    diff = (out.float() - expected.float()).abs().max().item()
    if wrong or diff > 1e-2:
        bad += 1
    print(f"round {i}: filler elements overwritten {wrong}, gemm max diff {diff:.3g}")
    del filler
print("bad rounds", bad)
