"""End-to-end decode step of an HF transformers DeepSeek-V3-style model: Inductor vs moe_fusion.

A decode step is the model's forward on one new token per sequence (batch B -> M = B tokens
through every MoE layer). The KV cache is left out (use_cache=False): the step then measures
exactly the per-token work the MoE fusion changes, and no cache object complicates compilation.
Greedy generation (recomputing the prefix each step) checks that the compiled models produce
the same tokens as eager. Both compiled variants use the same torch.compile mode (default
"reduce-overhead": CUDA graphs per batch size, as a decode server runs them).

Two timings per variant: a step on its own (host launch work before the first kernel included,
~350 us of it at real size on an H100) and steps back to back (the host runs ahead of the GPU, as a
server's loop does, so the GPU's time per step shows).

    python benchmarks/e2e_decode.py --config real --layers 2 --batch 1,4,16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moe_fusion import hf_models

REAL = dict(  # DeepSeek-V3 sizes for the MoE layers; attention and vocabulary kept modest
    hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, n_group=8,
    topk_group=4, num_experts_per_tok=8, routed_scaling_factor=2.5, intermediate_size=18432,
    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, head_dim=64, vocab_size=32000,
)


def step_us(model, token_ids, steps=20) -> float:
    """Median µs of one decode step: CUDA events on the GPU, the wall clock on the CPU (a smoke run)."""
    with torch.no_grad():
        for _ in range(3):
            model(token_ids, use_cache=False)
        return statistics.median(_one_step_us(model, token_ids) for _ in range(steps))


def back_to_back_us(model, token_ids, steps=20) -> float:
    """Mean µs per step of ``steps`` steps launched without waiting for each other."""
    with torch.no_grad():
        return _steps_us(model, token_ids, steps) / steps


def _one_step_us(model, token_ids) -> float:
    return _steps_us(model, token_ids, 1)


def _steps_us(model, token_ids, steps) -> float:
    if not token_ids.is_cuda:
        t0 = time.perf_counter()
        for _ in range(steps):
            model(token_ids, use_cache=False)
        return (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        model(token_ids, use_cache=False)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def greedy(model, prompt, new_tokens) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(tokens, use_cache=False).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompt.shape[1]:]


def teacher_forced(model, eager, prompt, generated) -> dict:
    """Next-token picks of ``model`` on eager's own greedy prefixes, so one flip does not derail the
    rest. A differing pick is a tie when eager scores it within the two models' own logit
    difference at that position (max |model - eager| over the vocabulary): the numerics of the
    run, not the routing or the kernels, decided it."""
    agree = ties = 0
    errors = []
    with torch.no_grad():
        for i in range(generated.shape[1]):
            tokens = torch.cat([prompt, generated[:, :i]], dim=1)
            want = eager(tokens, use_cache=False).logits[:, -1].float()
            got = model(tokens, use_cache=False).logits[:, -1].float()
            pick, want_pick = got.argmax(-1), want.argmax(-1)
            noise = (got - want).abs().amax(-1)
            margin = want.gather(1, want_pick[:, None])[:, 0] - want.gather(1, pick[:, None])[:, 0]
            agree += int((pick == want_pick).sum())
            ties += int(((pick != want_pick) & (margin <= noise)).sum())
            errors.append(float((got - want).norm() / want.norm()))
    total = generated.numel()
    return {"agree": agree / total, "ties": ties / total, "unexplained": (total - agree - ties) / total,
            "logits_rel_err": max(errors)}


def _picks(forced: dict) -> str:
    return f"{forced['agree']:.2f} / {forced['ties']:.2f} / {forced['unexplained']:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["real", "tiny"], default="real")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--mode", default="reduce-overhead", help='torch.compile mode ("default": no CUDA graphs)')
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help='"cpu": a smoke run of the script (wall clock, reference layers)')
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per variant and batch")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    overrides = dict(REAL) if args.config == "real" else {}
    overrides.update(num_hidden_layers=args.layers, first_k_dense_replace=0)
    t0 = time.time()
    model = hf_models.build_model("deepseek_v3", dtype=dtype, device=args.device, **overrides)
    print(f"built {args.config} model, {args.layers} MoE layers, {dtype}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.1f} B params in {time.time() - t0:.0f} s",
          file=sys.stderr)
    # The backend by function, not by name: the name needs the package's entry point (pip
    # install), and this script also runs from a plain checkout on PYTHONPATH.
    from moe_fusion.backend import moe_fusion_backend

    mode = None if args.mode == "default" else args.mode
    variants = {
        "eager": model,
        "inductor": torch.compile(model, mode=mode),
        "moe_fusion": torch.compile(model, backend=moe_fusion_backend, mode=mode),
    }
    rows = []
    vocab = model.config.vocab_size
    for batch in [int(b) for b in args.batch.split(",")]:
        row = {"batch": batch}
        step = torch.randint(3, vocab, (batch, 1), device=args.device)
        for name, m in variants.items():
            row[f"{name}_us"] = step_us(m, step, args.steps)
            row[f"{name}_back_to_back_us"] = back_to_back_us(m, step, args.steps)
        prompt = torch.randint(3, vocab, (batch, 4), device=args.device)
        expected = greedy(model, prompt, args.new_tokens)
        for name in ("inductor", "moe_fusion"):
            row[f"{name}_tokens_equal_eager"] = float((greedy(variants[name], prompt, args.new_tokens) == expected)
                                                      .float().mean())
            row[f"{name}_teacher_forced"] = teacher_forced(variants[name], model, prompt, expected)
        row["speedup_vs_inductor"] = row["inductor_us"] / row["moe_fusion_us"]
        row["back_to_back_speedup_vs_inductor"] = row["inductor_back_to_back_us"] / row["moe_fusion_back_to_back_us"]
        row["moe_fusion_tokens_per_s"] = batch / (row["moe_fusion_us"] * 1e-6)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    from moe_fusion import last_report

    report = last_report()
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{args.config} DeepSeek-V3-style, {args.layers} layers, {args.dtype}, mode {args.mode}, device "
          f"{device}, torch {torch.__version__}; layers matched over all compiles: {report.count('matched')}")
    print("| batch | eager µs | Inductor µs | moe_fusion µs | speedup vs Inductor | back to back: Inductor / "
          "moe_fusion µs per step, speedup | greedy tokens equal eager "
          "(Inductor / moe_fusion) | teacher-forced picks: agree / tie / unexplained (Inductor; moe_fusion) | "
          "max logits rel err (Inductor / moe_fusion) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        forced = "; ".join(_picks(r[f"{n}_teacher_forced"]) for n in ("inductor", "moe_fusion"))
        print(f"| {r['batch']} | {r['eager_us']:.0f} | {r['inductor_us']:.0f} | {r['moe_fusion_us']:.0f} | "
              f"{r['speedup_vs_inductor']:.2f}x | {r['inductor_back_to_back_us']:.0f} / "
              f"{r['moe_fusion_back_to_back_us']:.0f}, {r['back_to_back_speedup_vs_inductor']:.2f}x | "
              f"{r['inductor_tokens_equal_eager']:.2f} / "
              f"{r['moe_fusion_tokens_equal_eager']:.2f} | {forced} | "
              f"{r['inductor_teacher_forced']['logits_rel_err']:.1e} / {r['moe_fusion_teacher_forced']['logits_rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "layers": args.layers, "dtype": args.dtype, "mode": args.mode, "rows": rows,
                       "layers_matched_over_compiles": report.count("matched"),
                       "device": device, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
