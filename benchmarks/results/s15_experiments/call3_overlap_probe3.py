"""Session 15 probe 3 (issue 6): what slows the fp8 shared expert beside the preamble.
dsv3-ep8 fp8, fp8 shared expert on the expert kernels, M = 1, 4, graph replay, median of 3 interleaved rounds:
  shared             alone (fp8 groups made beforehand)
  stream             forked after the norm (the layer now)
  early              forked before the norm on fp8 groups made beforehand (bound of a norm-free fork)
  own                forked before the preamble with its own norm (SharedExpertOnExpertKernels.normalizing)
  *+prio             the side stream created with high priority
  *-sm16             the shared expert's persistent grids 16 SMs short of the device's"""
import statistics, sys
sys.path.insert(0, "benchmarks")
import torch
from gpu_overlap import input_sets
from layer_cases import layer_weights
from moe_fusion.lowering import layer, preamble, reference, streams
from moe_fusion.lowering.shared_expert import SharedExpertOnExpertKernels
from moe_fusion.tools import timing
from moe_fusion.tools.bench_layers import SHAPES

dev = torch.device("cuda")
spec = SHAPES["dsv3-ep8"].replace(quant="fp8_block")
w = layer_weights(spec, dev, seed=0)
normal_side = streams.side_stream(dev)
high_side = torch.cuda.Stream(device=dev, priority=-1)
print("priority range", torch.cuda.Stream.priority_range(), "high stream priority", high_side.priority)
idx = dev.index if dev.index is not None else torch.cuda.current_device()


def job(normed, xq, xs, sm_short):
    j = SharedExpertOnExpertKernels(spec, normed, xq, xs, w, True, False)
    j.launch.num_sms -= sm_short
    return j


def make(kind, block_m, quantized, prio, sm_short):
    side = high_side if prio else normal_side

    def run(x, normed):
        streams._side_streams[idx] = side
        if kind == "shared":
            job(normed, *quantized[id(normed)], sm_short).run()
        elif kind == "own":
            j = SharedExpertOnExpertKernels.normalizing(spec, x, w, True, False, normed.dtype)
            j.launch.num_sms -= sm_short
            streams.fork(x.device, j.run)
            preamble.fused_preamble(spec, x, w, block_m=block_m)
            streams.join(x.device)
        elif kind == "early":
            streams.fork(x.device, job(normed, *quantized[id(normed)], sm_short).run)
            preamble.fused_preamble(spec, x, w, block_m=block_m)
            streams.join(x.device)
        else:
            fork = lambda n, q, s: streams.fork(x.device, job(n, q, s, sm_short).run)  # noqa: E731
            preamble.fused_preamble(spec, x, w, block_m=block_m, after_norm=fork)
            streams.join(x.device)
        streams._side_streams[idx] = normal_side
    return run


for M in (1, 4):
    block_m = layer.plan_layer(spec, M, dev).expert_config.block_m
    sets = input_sets(spec, M, dev, 8)
    quantized = {id(n): reference.quantize_fp8_groups(n) for _, n in sets}
    names = {}
    for sm_short in (0, 16):
        for prio in (False, True):
            for kind in ("shared", "stream", "early", "own"):
                name = kind + ("+prio" if prio else "") + (f"-sm{sm_short}" if sm_short else "")
                names[name] = make(kind, block_m, quantized, prio, sm_short)
    us = {k: [] for k in names}
    for _ in range(3):
        for k, fn in names.items():
            us[k].append(timing.graph_replay_us(fn, sets))
    med = {k: statistics.median(v) for k, v in us.items()}
    base = med["shared"]
    print(f"M={M}: " + ", ".join(f"{k} {v:.2f} ({v / base:.3f})" for k, v in med.items()), flush=True)
