"""Local model folders that vLLM can load without a hub: tiny random MoE checkpoints (tests)
and config-only folders with real shapes (benchmarks with load_format="dummy").

    from sere.harness.vllm_testing import save_tiny_checkpoint
    path = save_tiny_checkpoint("qwen2_moe", tmp_dir)          # weights, tokenizer, similarity
    LLM(model=str(path), hf_overrides={"architectures": ["Qwen2MoeForCausalLMSERE"],
                                       "select_top_k": 1, "threshold": 0.1})

The similarity artifact written here is RANDOM (symmetric, values in [-1, 1), unit diagonal):
it exercises the routing path, it says nothing about quality.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

# transformers model_type -> (stock vLLM architecture, SERE architecture or None).
ARCHITECTURES = {
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeForCausalLMSERE"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForCausalLMSERE"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepseekV2ForCausalLMSERE"),
    "mixtral": ("MixtralForCausalLM", None),
    "olmoe": ("OlmoeForCausalLM", None),
}


# What vLLM's CPU backend needs of the tiny configs (sere.harness.model_configs): attention head sizes
# it has kernels for (32, 64, ...; the tiny models have 16), and DeepSeek-V2's MLA cache shape
# (kv_lora_rank 512 + rope 64, the only one the CPU MLA kernel supports).
VLLM_CPU_OVERRIDES = {
    "qwen2_moe": dict(num_attention_heads=2, num_key_value_heads=2),
    "qwen3_moe": dict(head_dim=32),
    "deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, head_dim=64),
    "mixtral": dict(head_dim=32),
    "olmoe": dict(num_attention_heads=2, num_key_value_heads=2),
}


def random_similarity(num_experts: int, layers: Iterable[int], seed: int = 0,
                      low: float = -1.0) -> dict[int, torch.Tensor]:
    """{layer: [E, E] float32}: symmetric, uniform in [low, 1) off the diagonal, 1 on it.
    low=-1 (tests) makes critical experts common at threshold 0; low=0 is CKA's range."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        m = torch.rand(num_experts, num_experts, generator=gen) * (1 - low) + low  # E, E
        m = (m + m.T) / 2
        m.fill_diagonal_(1.0)
        out[int(layer)] = m
    return out


def save_random_similarity(model_dir: str | Path, config, *, seed: int = 0, num_experts: int | None = None,
                           layers: Iterable[int] | None = None, path: str | Path | None = None,
                           low: float = -1.0) -> Path:
    """Write a random artifact that fits `config` (or the given expert count / layers)."""
    from sere.artifact import moe_layer_indices, save_similarity
    from sere.harness.model_configs import num_experts_of

    E = num_experts if num_experts is not None else num_experts_of(config)
    layers = list(layers) if layers is not None else moe_layer_indices(config)
    meta = {"model_type": config.model_type, "method": "random", "note": "random matrices for tests/benchmarks"}
    return save_similarity(path or model_dir, random_similarity(E, layers, seed, low), meta)


def save_byte_tokenizer(model_dir: str | Path, vocab_size: int = 256) -> None:
    """A byte-level tokenizer with one token per byte (ids 0..255), no merges: enough for vLLM
    to encode prompts and decode outputs of a model whose vocabulary has >= 256 entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256:
        raise ValueError(f"a byte tokenizer needs a vocabulary of at least 256, got {vocab_size}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    ordered = sorted(vocab, key=vocab.get)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ordered[0], eos_token=ordered[1], unk_token=None, pad_token=ordered[1]
    )
    fast.model_max_length = 4096
    fast.save_pretrained(str(model_dir))


def save_tiny_checkpoint(arch: str, model_dir: str | Path, *, seed: int = 0, similarity: bool = True,
                         sim_seed: int = 0, dtype=torch.float32, overrides: dict | None = None) -> Path:
    """A tiny random `arch` model (sere.harness.model_configs, with VLLM_CPU_OVERRIDES unless
    `overrides` is given) saved with a byte tokenizer and, with `similarity`, a random
    sere_similarity.safetensors beside it. Returns the folder."""
    from sere.harness.model_configs import build_tiny_model

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    overrides = VLLM_CPU_OVERRIDES.get(arch, {}) if overrides is None else overrides
    model = build_tiny_model(arch, seed=seed, dtype=dtype, **overrides)
    model.config.architectures = [ARCHITECTURES[arch][0]]
    model.save_pretrained(str(model_dir))
    save_byte_tokenizer(model_dir, model.config.vocab_size)
    if similarity:
        save_random_similarity(model_dir, model.config, seed=sim_seed)
    return model_dir


def save_config_only(config, model_dir: str | Path, *, architecture: str, tokenizer: bool = True) -> Path:
    """A folder holding only config.json (and a byte tokenizer): enough for vLLM with
    load_format="dummy" (random weights), for benchmarks at real shapes."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config.architectures = [architecture]
    d = config.to_dict()
    (model_dir / "config.json").write_text(json.dumps(d, indent=2))
    if tokenizer:
        save_byte_tokenizer(model_dir, config.vocab_size)
    return model_dir
