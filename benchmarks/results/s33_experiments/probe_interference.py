"""Session 33 probe: what the fp8 shared expert pays beside the preamble when it waits for nothing.

gpu_overlap's `pre+shared unblocked` reads ~2 µs (M = 1) / ~3 µs (M = 4) over the shared expert alone.
Split it: the fork itself (nothing on the main stream), beside the norm only, beside a plain read of the
router's bytes (torch's sum of a copy of the router weight), beside three tiny kernels (no bytes), and
beside the whole preamble. And the shared expert with a norm kernel of its own on the side stream, its GEMM1
that norm's programmatic dependent (asking L2 for its first K steps of weights before it waits). And a timing proxy
of one stream (norm, shared GEMM1 as its dependent, routing; wrong logits: see one_stream_chain). Same timing and
weight copies as gpu_overlap (fp8 experts, fp8 shared expert).

    git apply benchmarks/results/s33_experiments/gemm1_after_norm_pdl_prefetch.patch  # the variants need it
    python benchmarks/results/s33_experiments/probe_interference.py [--m 1,4] [--gemm1 split_k=2,...] [--routing]
        [--prefetch-steps N]
"""
import argparse
import dataclasses
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
ov = runpy.run_path(os.path.join(ROOT, "benchmarks", "gpu_overlap.py"))
from moe_fusion.lowering import experts, preamble, route_align_kernel, streams  # noqa: E402
from moe_fusion.lowering.norm_quant_kernel import norm_quant, norm_quant_outputs  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402


def variants(spec, block_m, quantized):
    base = ov["variant_fn"]
    ready = lambda w, normed: ov["SharedExpertOnExpertKernels"](  # noqa: E731
        spec, normed, *quantized[id(normed)], w, True, False)

    def beside(main_work):
        def fn(x, normed, w):
            job = ready(w, normed)
            streams.fork(x.device, job.run)
            main_work(x, w)
            streams.join(x.device)
            del job
        return fn

    def norm(x, w, outputs=None, pdl=False):
        return norm_quant(x, w.norm_weight, spec.rms_norm_eps, True, out_dtype=preamble.normed_dtype_of(spec, x, w),
                          pdl=pdl, outputs=outputs)

    def norm_then_shared(x, w, pdl):  # on this stream; with pdl GEMM1 is the norm's programmatic dependent
        outputs = norm_quant_outputs(x, True, preamble.normed_dtype_of(spec, x, w))
        job = ov["SharedExpertOnExpertKernels"](spec, *outputs, w, True, False)
        norm(x, w, outputs, pdl)
        job.run(after_previous=pdl)
        return job

    def own_norm(late):
        """The shared expert's own norm kernel on the side stream, its GEMM1 that norm's programmatic
        dependent; forked before the preamble, or (late) queued once the preamble's norm is."""
        def fn(x, normed, w):
            outputs = norm_quant_outputs(x, True, preamble.normed_dtype_of(spec, x, w))
            job = ov["SharedExpertOnExpertKernels"](spec, *outputs, w, True, False)
            start = streams.mark(x.device)

            def side():
                norm(x, w, outputs, True)
                job.run(after_previous=True)
            if not late:
                streams.fork(x.device, side)  # job is held by side() until the join
            preamble.fused_preamble(spec, x, w, block_m=block_m,
                                    after_norm=(lambda *_: streams.fork(x.device, side, after=start)) if late else None)
            streams.join(x.device)
        return fn

    def skipping_norm_wait(run):
        preamble.ROUTER_SKIPS_NORM_WAIT = True
        try:
            return run()
        finally:
            preamble.ROUTER_SKIPS_NORM_WAIT = False

    def one_stream_chain(x, normed, w):
        """Timing proxy of one stream: norm, the shared GEMM1 as its programmatic dependent, then the router
        (placed while they run), routing and alignment; the shared expert's combine and GEMM2 on the side
        stream once they are done. The router does not wait for the norm (ROUTER_SKIPS_NORM_WAIT), as a
        router synchronised with the norm by a counter would not wait for the shared GEMM1: its logits are
        wrong here, only the times count."""
        jobs = []

        def queue_gemm1(*norm_outputs):
            jobs.append(ov["SharedExpertOnExpertKernels"](spec, *norm_outputs, w, True, False))
            jobs[0].launch.gemm1(jobs[0].config, after_previous=True)
        skipping_norm_wait(lambda: preamble.fused_preamble(spec, x, w, block_m=block_m, after_norm=queue_gemm1))
        job = jobs[0]
        streams.fork(x.device, lambda: (job.launch.prepare_h(), job.run_gemm2()))
        streams.join(x.device)

    def tiny(x, w):
        t = torch.empty(1024, device=x.device)
        for _ in range(3):
            t.fill_(1.0)

    def check(x, w):
        """The programmatic-dependent GEMM1 gives the same bits as the plain launch."""
        plain, dependent = norm_then_shared(x, w, False), norm_then_shared(x, w, True)
        torch.cuda.synchronize()
        return torch.equal(plain.out, dependent.out) and bool(torch.isfinite(plain.out).all())

    return check, {
        "shared": base("shared", spec, block_m, "kernels-fp8", quantized),
        "shared forked": beside(lambda x, w: None),
        "beside 3 tiny": beside(tiny),
        "beside norm": beside(lambda x, w: norm(x, w)),
        "beside router read": beside(lambda x, w: w.router_weight.sum()),
        "beside preamble": beside(lambda x, w: preamble.fused_preamble(spec, x, w, block_m=block_m)),
        "norm+shared": lambda x, normed, w: norm_then_shared(x, w, False) and None,
        "norm+shared pdl": lambda x, normed, w: norm_then_shared(x, w, True) and None,
        "own norm": own_norm(False),
        "own norm late": own_norm(True),
        "one-stream chain": one_stream_chain,
        "preamble no norm wait": lambda x, normed, w: skipping_norm_wait(
            lambda: preamble.fused_preamble(spec, x, w, block_m=block_m)) and None,
        "pre+shared stream": base("pre+shared stream", spec, block_m, "kernels-fp8", quantized),
        "preamble": base("preamble", spec, block_m, "kernels-fp8", quantized),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--gemm1", default="", help="overrides of the shared GEMM1 tiles, e.g. split_k=2")
    ap.add_argument("--prefetch-steps", type=int, default=experts.GEMM1_PREFETCH_STEPS)
    ap.add_argument("--routing", action="store_true",
                    help="session 32's best routing at M = 4: one router program per SM, one route-align kernel")
    args = ap.parse_args()
    experts.GEMM1_PREFETCH_STEPS = args.prefetch_steps
    if args.routing:
        preamble.ROUTER_PROGRAMS_PER_SM, route_align_kernel.ROUTE_ALIGN_MAX_TILE = 1, 1024
    if args.gemm1:
        tiles = {k: int(v) for k, v in (kv.split("=") for kv in args.gemm1.split(","))}
        tuned = experts.shared_expert_config
        experts.shared_expert_config = lambda *a: dataclasses.replace(
            tuned(*a), gemm1=dataclasses.replace(tuned(*a).gemm1, **tiles))
    device = torch.device("cuda")
    spec = ov["SHAPES"]["dsv3-ep8"].replace(quant="fp8_block")
    weights = ov["weight_copies"](ov["layer_weights"](spec, device, seed=0), ov["copies_out_of_l2"](spec, True, device))
    for M in (int(m) for m in args.m.split(",")):
        block_m = ov["layer"].plan_layer(spec, M, device).expert_config.block_m
        sets = ov["with_weights"](ov["input_sets"](spec, M, device, ov["N_SETS"]), weights)
        quantized = {id(normed): ov["reference"].quantize_fp8_groups(normed) for _, normed, _ in sets}
        check, fns = variants(spec, block_m, quantized)
        print(f"M={M} same bits with the dependent GEMM1: {all(check(x, w) for x, _, w in sets[:2])}", flush=True)
        us = {name: timing.graph_replay_us(fn, sets) for name, fn in fns.items()}
        alone = us["shared"]
        print(f"gemm1 {args.gemm1 or 'tuned'} prefetch {args.prefetch_steps} routing {args.routing} M={M}: " + ", ".join(
            f"{k} {v:.2f} ({v / alone:.3f})" for k, v in us.items()), flush=True)


if __name__ == "__main__":
    main()
