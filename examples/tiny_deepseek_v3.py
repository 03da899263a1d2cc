"""Compile a tiny DeepSeek-V3-style HF transformers model (random weights, no downloads) with the
moe_fusion backend, and check its logits against eager PyTorch.

    python examples/tiny_deepseek_v3.py [--dtype bfloat16] [--tokens 4]
"""
import argparse

import torch

import moe_fusion
from moe_fusion import hf_models

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=4)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    model = hf_models.build_model("deepseek_v3", dtype=dtype)
    # Decode-style input: one new token for each of `tokens` sequences.
    token_ids = torch.randint(3, model.config.vocab_size, (args.tokens, 1))
    with torch.no_grad():
        expected = model(token_ids).logits
        compiled = torch.compile(model, backend="moe_fusion", dynamic=True)
        got = compiled(token_ids).logits

    report = moe_fusion.last_report()
    print(report.format_text())
    error = float((got.double() - expected.double()).norm() / expected.double().norm())
    print(f"logits relative error vs eager: {error:.2e} (tolerance {TOLERANCE[dtype]:.0e})")
    matched_all = report.matched == hf_models.count_moe_layers(model)
    return 0 if error < TOLERANCE[dtype] and matched_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
