"""Model configurations built locally (no hub): tiny random models for tests, and the
published shapes of the paper's models for benchmarks.

`tiny_config(arch)` returns a transformers config small enough for CPU tests;
`build_tiny_model(arch)` instantiates it with seeded random weights.
"""
from __future__ import annotations

from typing import Any

# Shared by every tiny model: 2 decoder layers, 8 experts, top-4 (DeepSeek-V2 keeps its
# first layer dense, as the real model does, so it gets 3 layers).
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=4,
    tie_word_embeddings=False,
)

TINY_ARCHS = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "mixtral", "olmoe")


def tiny_config(arch: str, **overrides):
    """A tiny transformers config of `arch` (one of TINY_ARCHS)."""
    import transformers as tf

    kw = dict(_TINY_COMMON)
    if arch == "qwen2_moe":
        kw.update(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=False)
        cls = tf.Qwen2MoeConfig
    elif arch == "qwen3_moe":
        kw.update(num_experts=8, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True)
        cls = tf.Qwen3MoeConfig
    elif arch == "deepseek_v2":
        kw.update(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            num_key_value_heads=4,
        )
        cls = tf.DeepseekV2Config
    elif arch == "mixtral":
        kw.update(num_local_experts=8, head_dim=16)
        cls = tf.MixtralConfig
    elif arch == "olmoe":
        kw.update(num_experts=8, intermediate_size=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        cls = tf.OlmoeConfig
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    kw.update(overrides)
    return cls(**kw)


def build_tiny_model(arch: str, seed: int = 0, dtype=None, **overrides):
    """A tiny random-weight causal LM of `arch`, in eval mode, on the CPU."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def num_experts_of(config) -> int:
    """Routed expert count of a transformers MoE config, whatever the family calls it."""
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"{type(config).__name__} has no routed expert count (not an MoE config?)")
