"""Session 34 probe (prepared; no machine was lent in session 34): is the fp8 shared expert's excess beside the
preamble the two sharing SMs, or sharing HBM?

Session 33 found a plain read of the router's 3.7 MB beside the shared expert costs it 4.5 µs, three times its
bytes' share of the shared GEMM1's stream, and each empty kernel launched beside it ~0.25 µs. The shared GEMM1 is one
wave of 128 programs, so a program slowed by a neighbour on its SM delays the whole launch. Green contexts split the
SMs: here the shared expert runs on a set of `count` SMs and the preamble (or a plain read, or empty kernels) on the
rest, so that they share HBM and L2 but no SM. If the shared expert then reads close to its time alone, a layout with
the norm and the shared GEMM1 (its programmatic dependent) on one partition and the routing on the other is worth
building; if not, the excess is HBM's and #6's last target is out of reach, as session 33 concluded.

First it checks, from the SM ids its programs record, that the two partitions are disjoint. Then, timed as
gpu_overlap times (graph replay, weight copies out of L2, fp8 experts, fp8 shared expert; ratios to the shared
expert alone on every SM):
- `S: shared`: the shared expert alone on its partition (with 112 SMs its GEMM1 retiled to one wave: `--gemm1`);
- `S: shared | R: ...`: beside nothing, three empty kernels, a plain read of the router weight, the preamble on
  inputs made beforehand (the bound for a shared expert that waits for nothing);
- `R: preamble`: the preamble alone on the rest, to see what the few SMs cost the routing;
- `beside preamble` and `pre+shared stream`: session 33's unpartitioned figures, in the same process.
With session 33's patch applied (call3_green_partition.sh applies it), also the layout a partition would allow: the
norm and then the shared expert, its GEMM1 the norm's programmatic dependent, on one stream, and the router, routing
and alignment on the other after an event behind the norm; on the two partitions (`S: norm+shared pdl | R: ...`) and,
for comparison, unpartitioned (`norm+shared pdl | side: ...`).

    python benchmarks/results/s34_experiments/probe_green_partition.py [--m 1,4] [--sms 128,112]
"""
import argparse
import contextlib
import ctypes
import dataclasses
import os
import runpy
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
ov = runpy.run_path(os.path.join(ROOT, "benchmarks", "gpu_overlap.py"))
from moe_fusion.lowering import experts, norm_quant_kernel, preamble  # noqa: E402
from moe_fusion.lowering import streams  # noqa: E402
from moe_fusion.tools import timing  # noqa: E402

# Session 33's patch (applied by call3_green_partition.sh) adds what the candidate layout needs.
PATCHED = hasattr(norm_quant_kernel, "norm_quant_outputs")
CU_DEV_RESOURCE_TYPE_SM = 1
CU_GREEN_CTX_DEFAULT_STREAM = 1
CU_STREAM_NON_BLOCKING = 1
RESOURCE_BYTES = 512  # CUdevResource: 144 bytes in CUDA 12.4's header, a pointer more since; only the driver reads it
# One wave of the shared GEMM1 on a partition of this many SMs (items = I / block_n x split_k); the tuned tiles fill 128.
ONE_WAVE_GEMM1 = {128: {}, 112: {"block_n": 128, "split_k": 7}, 96: {"block_n": 64, "split_k": 3}}


class Partition:
    """Two green contexts on disjoint SMs of one device, `count` SMs and the rest, each with a stream."""

    def __init__(self, count: int, device: torch.device):
        self.cu = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        self._check(self.cu.cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
        whole, part, rest = (ctypes.create_string_buffer(RESOURCE_BYTES) for _ in range(3))
        self._check(self.cu.cuDeviceGetDevResource(dev, whole, CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
        groups = ctypes.c_uint(1)
        self._check(self.cu.cuDevSmResourceSplitByCount(part, ctypes.byref(groups), whole, rest, 0, count),
                    "cuDevSmResourceSplitByCount")
        self.shared_stream, self.rest_stream = (self._stream(dev, r, device) for r in (part, rest))

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} returned CUresult {result}")

    def _stream(self, dev, resource, device) -> torch.cuda.ExternalStream:
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.cu.cuDevResourceGenerateDesc(ctypes.byref(desc), resource, 1), "cuDevResourceGenerateDesc")
        self._check(self.cu.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, CU_GREEN_CTX_DEFAULT_STREAM),
                    "cuGreenCtxCreate")
        self._check(self.cu.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, CU_STREAM_NON_BLOCKING, 0),
                    "cuGreenCtxStreamCreate")
        return torch.cuda.ExternalStream(stream.value, device=device)


@triton.jit
def _record_sm_ids(out_ptr):
    pid = tl.program_id(0)
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + pid, sm)


def sms_used(stream, device, programs: int = 8192) -> set:
    ids = torch.empty(programs, dtype=torch.int32, device=device)
    with torch.cuda.stream(stream):
        _record_sm_ids[(programs,)](ids)
    torch.cuda.synchronize()
    return set(ids.tolist())


@contextlib.contextmanager
def sm_count_seen_as(count: int):
    """Launch configurations sized for `count` SMs: the shared expert's persistent grids and the router's split."""
    facts, sm_count = experts.device_facts, preamble._sm_count
    experts.device_facts = lambda device: (facts(device)[0], count)
    preamble._sm_count = lambda index: count
    try:
        yield
    finally:
        experts.device_facts, preamble._sm_count = facts, sm_count


@contextlib.contextmanager
def gemm1_tiles(overrides: dict):
    tuned = experts.shared_expert_config
    if overrides:
        experts.shared_expert_config = lambda *a: dataclasses.replace(
            tuned(*a), gemm1=dataclasses.replace(tuned(*a).gemm1, **overrides))
    try:
        yield
    finally:
        experts.shared_expert_config = tuned


def partitioned(part: Partition, shared_sms: int, rest_sms: int, spec, block_m, quantized, tiles: dict):
    def ready(w, normed):
        with sm_count_seen_as(shared_sms), gemm1_tiles(tiles):
            return ov["SharedExpertOnExpertKernels"](spec, normed, *quantized[id(normed)], w, True, False)

    def on(stream, work):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            return work()

    def join(*streams):
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)

    def shared_beside(rest_work):
        def fn(x, normed, w):
            job = ready(w, normed)  # its buffers, allocated here, held until the join
            on(part.shared_stream, job.run)
            held = on(part.rest_stream, lambda: rest_work(x, w)) if rest_work else None
            # Only streams the capture has reached may be joined: an event of a stream outside it is refused.
            join(part.shared_stream, *([part.rest_stream] if rest_work else []))
            del job, held
        return fn

    def tiny(x, w):
        t = torch.empty(1024, device=x.device)
        for _ in range(3):
            t.fill_(1.0)
        return t

    def routing(x, w):
        with sm_count_seen_as(rest_sms):
            return preamble.fused_preamble(spec, x, w, block_m=block_m)

    def routing_alone(x, normed, w):
        held = on(part.rest_stream, lambda: routing(x, w))
        join(part.rest_stream)
        del held

    return {
        "S: shared": shared_beside(None),
        "S: shared | R: 3 tiny": shared_beside(tiny),
        "S: shared | R: router read": shared_beside(lambda x, w: w.router_weight.sum()),
        "S: shared | R: preamble": shared_beside(routing),
        "R: preamble": routing_alone,
        **({"S: norm+shared pdl | R: routing after the norm": candidate_layout(
            spec, block_m, part.shared_stream, part.rest_stream, shared_sms, rest_sms, tiles)}
           if PATCHED else {}),
    }


def candidate_layout(spec, block_m, shared_stream, rest_stream, shared_sms: int, rest_sms: int,
                     tiles: dict):
    """The layout a partition would allow, as the layer would run it: on the shared expert's stream the norm, then
    the shared expert with its GEMM1 the norm's programmatic dependent (session 33's patch); on the other the
    router, routing and alignment, after an event recorded behind the norm. Every buffer is made on the calling
    stream before either is queued. shared_stream None: the calling stream. Needs session 33's
    gemm1_after_norm_pdl_prefetch.patch (norm_quant's `outputs`, `run(after_previous=)`)."""
    def fn(x, normed, w):
        shared = shared_stream or torch.cuda.current_stream()
        normed_dtype = preamble.normed_dtype_of(spec, x, w)
        outputs = norm_quant_kernel.norm_quant_outputs(x, True, normed_dtype)
        logits, counters = preamble.router_workspace(spec, x.shape[0], x.device)
        with sm_count_seen_as(rest_sms):
            plan = preamble.plan_preamble(spec, x.shape[0], normed_dtype, w.router_weight.dtype, x.device)
        with sm_count_seen_as(shared_sms), gemm1_tiles(tiles):
            job = ov["SharedExpertOnExpertKernels"](spec, *outputs, w, True, False)
        norm_done = torch.cuda.Event()

        def shared_side():
            norm_quant_kernel.norm_quant(x, w.norm_weight, spec.rms_norm_eps, True, logits, counters, normed_dtype,
                                         pdl=True, outputs=outputs)
            norm_done.record()
            job.run(after_previous=True)

        shared.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(shared):
            shared_side()
        rest_stream.wait_event(norm_done)
        with torch.cuda.stream(rest_stream):
            routed = preamble.route_normed(spec, w, outputs, logits, counters, plan, block_m,
                                           preamble._expert_map(spec, w, None), True, True)
        torch.cuda.current_stream().wait_stream(shared)
        torch.cuda.current_stream().wait_stream(rest_stream)
        return routed  # the job and the routing's outputs are held until here, after the joins
    return fn


def norm_then_shared_pdl(spec):
    """Session 33's `norm+shared pdl`: the norm, then the shared expert with its GEMM1 the norm's programmatic
    dependent, on one stream with nothing beside them."""
    def fn(x, normed, w):
        normed_dtype = preamble.normed_dtype_of(spec, x, w)
        outputs = norm_quant_kernel.norm_quant_outputs(x, True, normed_dtype)
        job = ov["SharedExpertOnExpertKernels"](spec, *outputs, w, True, False)
        norm_quant_kernel.norm_quant(x, w.norm_weight, spec.rms_norm_eps, True, out_dtype=normed_dtype, pdl=True,
                                     outputs=outputs)
        job.run(after_previous=True)
    return fn


def same_result(part: Partition, shared_sms: int, spec, quantized, tiles: dict, x, normed, w) -> bool:
    """The shared expert on its partition gives the all-SM launch's bits (its sums' order, where retiled, differs:
    then within fp8 rounding)."""
    plain = ov["SharedExpertOnExpertKernels"](spec, normed, *quantized[id(normed)], w, True, False)
    plain.run()
    with sm_count_seen_as(shared_sms), gemm1_tiles(tiles):
        moved = ov["SharedExpertOnExpertKernels"](spec, normed, *quantized[id(normed)], w, True, False)
    part.shared_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(part.shared_stream):
        moved.run()
    torch.cuda.current_stream().wait_stream(part.shared_stream)
    torch.cuda.synchronize()
    if not tiles:
        return torch.equal(plain.out, moved.out)
    return torch.allclose(moved.out, plain.out, rtol=2e-2, atol=2e-2 * float(plain.out.abs().max()))


def unpartitioned(spec, block_m, quantized, tiles: dict):
    base = ov["variant_fn"]
    fns = {"shared": base("shared", spec, block_m, "kernels-fp8", quantized),
           "beside preamble": base("pre+shared unblocked", spec, block_m, "kernels-fp8", quantized),
           "pre+shared stream": base("pre+shared stream", spec, block_m, "kernels-fp8", quantized),
           "preamble": base("preamble", spec, block_m, "kernels-fp8", quantized)}
    if PATCHED:
        fns["norm+shared pdl"] = norm_then_shared_pdl(spec)
        total = experts.device_facts(torch.device("cuda"))[1]
        fns["norm+shared pdl | side: routing after the norm"] = candidate_layout(
            spec, block_m, None, streams.side_stream(torch.device("cuda")), total,
            total, {})
    if tiles:
        retiled = fns["shared"]
        fns["shared, one-wave tiles"] = lambda *a: _with(gemm1_tiles(tiles), retiled, *a)
    return fns


def _with(context, fn, *args):
    with context:
        return fn(*args)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,4")
    ap.add_argument("--sms", default="128,112", help="SMs of the shared expert's partition, comma-separated")
    args = ap.parse_args()
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).multi_processor_count
    spec = ov["SHAPES"]["dsv3-ep8"].replace(quant="fp8_block")
    weights = ov["weight_copies"](ov["layer_weights"](spec, device, seed=0), ov["copies_out_of_l2"](spec, True, device))
    for count in (int(c) for c in args.sms.split(",")):
        try:
            part = Partition(count, device)
        except (OSError, AttributeError, RuntimeError) as e:  # no libcuda, an older driver, a refused split
            print(f"partition {count}: {type(e).__name__}: {e}", flush=True)
            continue
        shared_sms, rest_sms = sms_used(part.shared_stream, device), sms_used(part.rest_stream, device)
        print(f"partition {count}: shared stream on {len(shared_sms)} SMs, the rest on {len(rest_sms)}, "
              f"common {len(shared_sms & rest_sms)} (device {total})", flush=True)
        if shared_sms & rest_sms or len(shared_sms) + len(rest_sms) > total:
            print("not disjoint: skipped", flush=True)
            continue
        tiles = ONE_WAVE_GEMM1.get(len(shared_sms), {})
        for M in (int(m) for m in args.m.split(",")):
            block_m = ov["layer"].plan_layer(spec, M, device).expert_config.block_m
            sets = ov["with_weights"](ov["input_sets"](spec, M, device, ov["N_SETS"]), weights)
            quantized = {id(normed): ov["reference"].quantize_fp8_groups(normed) for _, normed, _ in sets}
            print(f"M={M} the partition's shared expert agrees with the all-SM one: "
                  f"{all(same_result(part, len(shared_sms), spec, quantized, tiles, *s) for s in sets[:2])}", flush=True)
            fns = {**unpartitioned(spec, block_m, quantized, tiles),
                   **partitioned(part, len(shared_sms), len(rest_sms), spec, block_m, quantized, tiles)}
            us = {}
            for name, fn in fns.items():
                try:
                    us[name] = timing.graph_replay_us(fn, sets)
                except Exception as e:  # a capture across green contexts may be refused: say so, go on
                    print(f"M={M} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            alone = us["shared"]
            print(f"partition {count} tiles {tiles or 'tuned'} M={M}: " + ", ".join(
                f"{k} {v:.2f} ({v / alone:.3f})" for k, v in us.items()), flush=True)


if __name__ == "__main__":
    main()
