"""Session 15 probe (issue 6): the best an fp8 shared expert that normalises x itself could do.
dsv3-ep8 fp8, fp8 shared expert on the expert kernels: 'shared' alone, 'pre+shared stream' (forked
after the norm, as now) and 'early fork' (forked before the norm, reading fp8 groups made beforehand:
what a shared expert with the norm folded in could reach, minus its own statistic's cost). Median of
3 rounds of graph replays, interleaved."""
import statistics, sys, os
sys.path.insert(0, "benchmarks")
import torch
from gpu_overlap import variant_fn, input_sets
from layer_cases import layer_weights
from moe_fusion.lowering import layer, preamble, reference, streams
from moe_fusion.lowering.shared_expert import SharedExpertOnExpertKernels
from moe_fusion.tools import timing
from moe_fusion.tools.bench_layers import SHAPES

dev = torch.device("cuda")
spec = SHAPES["dsv3-ep8"].replace(quant="fp8_block")
w = layer_weights(spec, dev, seed=0)
for M in (1, 4):
    block_m = layer.plan_layer(spec, M, dev).expert_config.block_m
    sets = input_sets(spec, M, dev, 8)
    quantized = {id(n): reference.quantize_fp8_groups(n) for _, n in sets}

    def early(x, normed):
        job = SharedExpertOnExpertKernels(spec, normed, *quantized[id(normed)], w, True, False)
        streams.fork(x.device, job.run)
        preamble.fused_preamble(spec, x, w, block_m=block_m)
        streams.join(x.device)

    fns = {"shared": variant_fn("shared", spec, w, block_m, "kernels-fp8", quantized),
           "preamble": variant_fn("preamble", spec, w, block_m, "kernels-fp8", quantized),
           "pre+shared stream": variant_fn("pre+shared stream", spec, w, block_m, "kernels-fp8", quantized),
           "early fork": early}
    us = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            us[k].append(timing.graph_replay_us(fn, sets))
    med = {k: statistics.median(v) for k, v in us.items()}
    print(f"M={M} " + " ".join(f"{k}: {v:.2f}" for k, v in med.items())
          + f" | ratio now {med['pre+shared stream'] / med['shared']:.3f}, early {med['early fork'] / med['shared']:.3f}",
          flush=True)
