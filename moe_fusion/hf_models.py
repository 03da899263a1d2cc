"""Tiny HuggingFace transformers MoE models built from configs with random weights (no downloads).

Used by the README example, ``moe-fusion inspect hf:<type>``, the benchmarks and the tests.
Needs ``transformers`` (the ``test`` extra); the rest of moe_fusion does not.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

_COMMON: Dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Each tiny config keeps the features its family is known for: DeepSeek-V3's grouped
# sigmoid routing with correction bias and a shared expert, Qwen3's softmax top-k, ...
TINY_CONFIGS: Dict[str, Dict[str, Any]] = {
    "deepseek_v3": dict(
        _COMMON,
        moe_intermediate_size=32,
        n_routed_experts=16,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        rope_scaling=None,
        num_key_value_heads=4,  # MLA has no grouped KV heads; fewer KV than query heads breaks attention
    ),
    "qwen3_moe": dict(
        _COMMON,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=12,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "mixtral": dict(_COMMON, head_dim=16, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _COMMON,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=12,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "llama4_text": dict(
        _COMMON,
        head_dim=16,
        intermediate_size_mlp=96,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
    ),
    "gpt_oss": dict(
        _COMMON,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    ),
}

_CAUSAL_LM = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}

MODEL_TYPES = tuple(_CAUSAL_LM)

# Families whose experts have one fixed forward (no grouped_mm / batched_mm choice).
_FIXED_EXPERTS_FORWARD = {"llama4_text"}


def make_config(model_type: str, experts_implementation: str = "grouped_mm", **overrides):
    import transformers

    if model_type not in _CAUSAL_LM:
        raise ValueError(f"unknown model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    config_cls = getattr(transformers, _CAUSAL_LM[model_type][0])
    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    if model_type not in _FIXED_EXPERTS_FORWARD:
        config._experts_implementation = experts_implementation
    return config


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh random weights everywhere (never zeros): matrices ~ N(0, 1/fan_in), vectors near 1
    (norm weights) and non-zero correction biases, so routing is not decided by ties."""
    generators = {}
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            if p.device not in generators:  # drawn where the weights live: real-size models are GBs
                generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            gen, device = generators[p.device], p.device
            # Drawn in the parameter's own dtype: an fp32 temporary of a real-size expert stack is 28 GB.
            values = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
            if p.dim() == 1:
                values = 0.1 * values if "bias" in name else 1.0 + 0.1 * values
            else:
                values /= p.shape[-1] ** 0.5
            p.copy_(values)
    return model


def build_model(
    model_type: str,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str = "grouped_mm",
    seed: int = 0,
    device: str = "cpu",
    **overrides,
) -> torch.nn.Module:
    """A ``<Family>ForCausalLM`` (tiny unless overridden) with random weights, in eval mode.

    Built directly on ``device`` in ``dtype``, so a real-size model never exists in fp32 or on the host.
    """
    import transformers

    config = make_config(model_type, experts_implementation, **overrides)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, _CAUSAL_LM[model_type][1])(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return randomize_(model, seed).to(dtype).eval()


def count_moe_layers(model: torch.nn.Module) -> int:
    """MoE blocks in an HF model: the modules that own both a router and an experts module."""
    return sum(
        1
        for m in model.modules()
        if hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router"))
    )
