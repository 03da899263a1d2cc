"""Temporary probe (not committed): why is expert_block_kernel slower than the chain?"""
import dataclasses, os, sys, torch, triton
from moe_fusion.lowering import experts, expert_configs, reference, tune_experts, expert_block_kernel as ebk
from moe_fusion.tools.timing import graph_replay_us

KNOBS = dict(pp=None, prefetch=True, stages=True)
orig = experts.ExpertLaunch.expert_block

def patched(self, config):
    M, H = self.x.shape
    I = self.experts.w_gate.shape[1]
    g1, g2 = config.gemm1, config.gemm2
    tiles = self._work_tiles(config)
    groups = triton.cdiv(I, 128) if self.experts.fp8 else 0
    items = (triton.cdiv(self._zero_numel(), experts.ZERO_BLOCK)
             + tiles * (triton.cdiv(I, g1.block_n) + groups + triton.cdiv(H, g2.block_n) * g2.split_k))
    pp = KNOBS["pp"] or max(g1.programs_per_sm, g2.programs_per_sm)
    grid = max(1, min(items, self.num_sms * pp))
    counters = experts._ticket_buffer(self.x.device, ebk.FIXED_COUNTERS + 2 * tiles)
    operands1, constants = self._gemm1_operands(config)
    operands2, constants2 = self._gemm2_operands(config)
    constants.update(constants2)
    st = (lambda g: g.num_stages) if KNOBS["stages"] else (lambda g: None)
    k = ebk.expert_block_kernel[(grid,)](
        *operands1, *operands2, *self.alignment, counters,
        self.topk_ids.numel(), self.a_row_divisor, M, H, I, self._zero_numel(), tiles,
        **constants,
        BLOCK_N1=g1.block_n, BLOCK_K1=g1.block_k, STAGES1=st(g1),
        BLOCK_N2=g2.block_n, BLOCK_K2=g2.block_k, STAGES2=st(g2),
        EVEN_N1=I % g1.block_n == 0, EVEN_K1=H % g1.block_k == 0,
        EVEN_N2=H % g2.block_n == 0, EVEN_K2=I % g2.block_k == 0,
        ZERO_BLOCK=experts.ZERO_BLOCK, PREFETCH_LINES=self._prefetch_lines(g2, self._k_per_split(g2)) if KNOBS["prefetch"] else 0,
        num_warps=max(g1.num_warps, g2.num_warps), num_stages=max(g1.num_stages, g2.num_stages),
    )
    KNOBS["last"] = (k.n_regs, k.metadata.shared, grid)
    self.h_quantized = True

experts.ExpertLaunch.expert_block = patched
shape = tune_experts.SHAPES["dsv3-ep8"]
bf16 = tune_experts.random_experts(shape, "bfloat16")
for dtype in ("fp8", "bfloat16"):
    e = experts.quantize_expert_tensors_fp8(bf16) if dtype == "fp8" else bf16
    key = tune_experts._key(shape, dtype)
    for m in (1, 4):
        sets = tune_experts.input_sets(shape, e, m, 8)
        cfg = expert_configs.lookup(key, m, *experts.device_facts(torch.device("cuda")))[0]
        aligned = [(s.x, s.ids, s.weights, reference.align_pairs(s.ids, e.expert_map, e.num_local, cfg.block_m)) for s in sets]
        def run(c):
            return lambda x, ids, w, al: experts.run_experts(x, ids, w, e, alignment=al, config=c)
        res = {"chain": graph_replay_us(run(cfg), aligned, replays=20, batches=5)}
        one = dataclasses.replace(cfg, single_launch=True)
        variants = [("base", {}), ("no prefetch", dict(prefetch=False)), ("pp1", dict(pp=1)), ("pp1 no prefetch", dict(pp=1, prefetch=False)),
                    ("kernel stages", dict(stages=False)), ("pp3", dict(pp=3))]
        for g1bn in (32,):
            variants.append((f"g1 bn{g1bn}", dict(cfg=dataclasses.replace(one, gemm1=dataclasses.replace(cfg.gemm1, block_n=g1bn)))))
        for name, kn in variants:
            c = kn.pop("cfg", one)
            KNOBS.update(pp=None, prefetch=True, stages=True); KNOBS.update(kn)
            try:
                res[name] = graph_replay_us(run(c), aligned, replays=20, batches=5)
                res[name + " info"] = KNOBS.get("last")
            except Exception as exc:
                res[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
        print(dtype, "M", m, cfg, flush=True)
        for k_, v in res.items():
            print("   ", k_, v if isinstance(v, (str, tuple)) else f"{v:.1f}", flush=True)
