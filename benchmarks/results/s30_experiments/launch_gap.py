"""Session 30, call 3: is the by-hits offset the host's launch of each batch's first replay?

Call 2: the capture spread (10 replays of 32 calls a batch) read the dsv3-ep8 fp8 layer at 28.5 / 44.4 us (M = 1,
0 / 1 local hits); by-hits in the same call (bench.time_point, replays from --seconds-per-point: ~3 at M = 1) read
30.4 / 45.7, first timing 29.3. time_point's batches start with start.record() on an idle GPU, so each batch also
times how long the host takes to launch its first replay, spread over replays x 32 calls. This times one graph per
hit count with 1, 3, 10 and 20 replays a batch, each batch started cold (start.record() on an idle GPU, as now) or
behind one untimed replay (the GPU busy while the timed replays are launched), alternated, 7 batches each, 3 rounds.
"""
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
from gpu_layer_by_hits import layer_bench_config, sets_by_hits  # noqa: E402
from moe_fusion.tools import bench, timing  # noqa: E402


def batch_us(graph, calls, replays, behind_one):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if behind_one:
        graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


@torch.no_grad()
def main():
    cfg = layer_bench_config(torch.device("cuda"), [1], 32, 0.25)
    spec = bench.shape_spec(cfg, "dsv3-ep8", "fp8")
    sb = bench.ShapeBench(cfg, spec)
    fn = bench.moe_fusion_fn(spec, "layer")
    found = sets_by_hits(sb, 1, 32, 4096)
    for h in (0, 1):
        inputs = [(x, sb.weights) for x in found[h]]
        graph, _ = timing.capture_calls(fn, inputs)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        for round_ in range(3):
            cells = []
            for replays in (1, 3, 10, 20):
                for behind_one in (False, True):
                    us = statistics.median(batch_us(graph, len(inputs), replays, behind_one) for _ in range(7))
                    cells.append(f"r{replays}{'+lead' if behind_one else ''}:{us:.2f}")
            print(f"h={h} round {round_}: " + " ".join(cells), flush=True)
    sb.close()


if __name__ == "__main__":
    main()
