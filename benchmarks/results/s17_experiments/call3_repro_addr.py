"""Find which gpu_overlap variant / kernel raises cudaErrorInvalidAddressSpace (fp8 experts, cuBLAS shared, M=4)."""
import os, sys, traceback
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks")]
import torch
import gpu_overlap as g
from layer_cases import layer_weights
from moe_fusion.tools import timing
M = int(os.environ.get("M", "4"))
copies = int(os.environ.get("COPIES", "2"))
shared_on = os.environ.get("SHARED_ON", "cublas")
dev = torch.device("cuda")
spec = g.SHAPES["dsv3-ep8"].replace(quant="fp8_block")
weights = g.weight_copies(layer_weights(spec, dev, seed=0), copies)
block_m = g.layer.plan_layer(spec, M, dev).expert_config.block_m
print("plan", g.layer.plan_layer(spec, M, dev), flush=True)
sets = g.input_sets(spec, M, dev, 8, weights)
for name in g.VARIANTS:
    fn = g.variant_fn(name, spec, block_m, shared_on, {})
    try:
        for s in sets:
            fn(*s)
            torch.cuda.synchronize()
        print("eager ok", name, flush=True)
        if os.environ.get("GRAPH", "1") == "1":
            us = timing.graph_replay_us(fn, sets)
            print("graph ok", name, round(us, 2), flush=True)
    except Exception as e:
        print("FAILED", name, repr(e)[:300], flush=True)
        traceback.print_exc(limit=8)
        break
