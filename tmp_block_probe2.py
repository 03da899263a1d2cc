"""Temporary probe: one local expert per call, exactly; where does the time go?"""
import dataclasses, torch, triton
from moe_fusion.lowering import experts, expert_configs, reference, tune_experts
from moe_fusion.tools.timing import graph_replay_us
shape = tune_experts.SHAPES["dsv3-ep8"]
bf16 = tune_experts.random_experts(shape, "bfloat16")
g = torch.Generator(device="cuda").manual_seed(3)
for dtype in ("fp8", "bfloat16"):
    e = experts.quantize_expert_tensors_fp8(bf16) if dtype == "fp8" else bf16
    key = tune_experts._key(shape, dtype)
    per_expert = tune_experts.expert_bytes(e)
    for m in (1, 4):
        cfg = expert_configs.lookup(key, m, *experts.device_facts(torch.device("cuda")))[0]
        sets = []
        for j in range(8):
            # slot 0: local expert j (global j < 32 are local); other slots non-local experts
            ids = torch.stack([torch.randperm(224, device="cuda", generator=g)[:8] + 32 for _ in range(m)]).int()
            ids[:, 0] = j
            w = torch.rand(m, 8, device="cuda", generator=g) + 0.1
            x = torch.randn(m, shape.hidden, device="cuda", generator=g).bfloat16()
            sets.append((x, ids, w / w.sum(-1, keepdim=True), reference.align_pairs(ids, e.expert_map, e.num_local, cfg.block_m)))
        res = {}
        for mode, c in (("chain", cfg), ("one", dataclasses.replace(cfg, single_launch=True))):
            launches = []
            res[mode] = graph_replay_us(lambda x, ids, w, al: experts.run_experts(x, ids, w, e, alignment=al, config=c), sets, replays=20, batches=5)
        # phases, as the tuner times them
        ls = []
        for (x, ids, w, al) in sets:
            l = experts.ExpertLaunch(x=x, pair_weights=w.reshape(-1).float(), topk_ids=ids, experts=e, alignment=al,
                                     weight_on_input=False, num_sms=132)
            l.allocate(cfg, False, torch.float32); l.quantize_input(); l.gemm1(cfg); l.quantize_h(); ls.append(l)
        res["xquant"] = graph_replay_us(lambda l: l.quantize_input(), [(l,) for l in ls], replays=20, batches=5) if e.fp8 else 0
        res["gemm1"] = graph_replay_us(lambda l: l.gemm1(cfg), [(l,) for l in ls], replays=20, batches=5)
        res["hquant"] = graph_replay_us(lambda l: l.quantize_h(), [(l,) for l in ls], replays=20, batches=5) if e.fp8 else 0
        res["gemm2"] = graph_replay_us(lambda l: l.gemm2(cfg), [(l,) for l in ls], replays=20, batches=5)
        gb = per_expert / 1e9
        print(f"{dtype} M={m} one expert {per_expert/1e6:.1f} MB floor@3.0 {per_expert/3.0e6:.1f} us | " +
              " ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
