"""Model configurations built locally (no hub): tiny random models for tests, and the
published shapes of the paper's models for benchmarks.

`tiny_config(arch)` returns a transformers config small enough for CPU tests;
`build_tiny_model(arch)` instantiates it with seeded random weights.
`real_config(name)` returns the published configuration of one of REAL_MODELS (random
weights only: no hub is reachable), and `layer_shapes(name)` the sizes of its MoE layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sere.artifact import num_experts_of  # noqa: F401 (the rule lives in the runtime; re-exported)

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


# --- real-size configs ----------------------------------------------------------------
# Values copied from each model's config.json as published on the Hugging Face hub
# (Qwen/Qwen1.5-MoE-A2.7B, deepseek-ai/DeepSeek-V2-Lite, Qwen/Qwen3-30B-A3B), written in
# transformers 5.x field names (rope_theta/rope_scaling become rope_parameters). Fields of
# the original that transformers' config classes do not take (DeepSeek's scoring_func,
# moe_layer_freq, aux_loss_alpha, seq_aux, ep_size) are left out: they are softmax, 1, and
# training-only settings, which the transformers classes assume.
REAL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=21,
        decoder_sparse_step=1,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts_per_tok=4,
        num_experts=60,
        norm_topk_prob=False,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
    )),
    "DeepSeek-V2-Lite": ("deepseek_v2", dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        head_dim=64,  # transformers' rotary size for DeepSeek-V2 = qk_rope_head_dim
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        hidden_act="silu",
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096},
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=100000,
        eos_token_id=100001,
    )),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        decoder_sparse_step=1,
        moe_intermediate_size=768,
        num_experts_per_tok=8,
        num_experts=128,
        norm_topk_prob=True,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )),
}

_CONFIG_CLASSES = {"qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig", "deepseek_v2": "DeepseekV2Config"}


def _real_entry(name: str) -> tuple[str, str, dict[str, Any]]:
    for known, (arch, values) in REAL_MODELS.items():
        if known.lower() == name.lower():
            return known, arch, values
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(REAL_MODELS)}")


def real_config(name: str, **overrides):
    """The published transformers config of `name` (one of REAL_MODELS, case-insensitive),
    with `overrides` applied (e.g. num_hidden_layers=2 for a short stack)."""
    import transformers as tf

    known, arch, values = _real_entry(name)
    cfg = getattr(tf, _CONFIG_CLASSES[arch])(**{**values, **overrides})
    cfg._name_or_path = known
    return cfg


@dataclass(frozen=True)
class LayerShapes:
    """Sizes of one MoE layer: what the benchmarks need to count bytes and build the layer."""

    arch: str
    num_experts: int  # E, routed experts
    top_k: int  # k
    hidden_size: int  # H
    moe_intermediate_size: int  # I, per routed expert
    shared_intermediate_size: int  # intermediate size of the always-on shared MLP (0: none)

    def expert_params(self) -> int:
        """Weights of one routed expert: gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def shared_params(self) -> int:
        """Weights of the shared expert MLP (plus Qwen2-MoE's 1-wide shared-expert gate)."""
        gate = self.hidden_size if self.arch == "qwen2_moe" and self.shared_intermediate_size else 0
        return 3 * self.hidden_size * self.shared_intermediate_size + gate

    def router_params(self) -> int:
        return self.num_experts * self.hidden_size


def layer_shapes(model) -> LayerShapes:
    """MoE layer sizes of a REAL_MODELS name or of a transformers MoE config."""
    cfg = real_config(model) if isinstance(model, str) else model
    arch = cfg.model_type
    if arch == "qwen2_moe":
        shared = cfg.shared_expert_intermediate_size
    elif arch == "deepseek_v2":
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts  # DeepSeek fuses its shared experts into one MLP
    elif arch in ("qwen3_moe", "olmoe", "mixtral"):
        shared = 0
    else:
        raise ValueError(f"layer_shapes does not know the MoE layer of {arch!r}")
    inter = cfg.intermediate_size if arch in ("olmoe", "mixtral") else cfg.moe_intermediate_size
    return LayerShapes(arch, num_experts_of(cfg), cfg.num_experts_per_tok, cfg.hidden_size, inter, shared)


@dataclass(frozen=True)
class WeightCounts:
    """Parameter counts of a whole model, split the way a decode step reads them: the routed
    experts (read only where a token is routed) and everything else (read every step)."""

    total: int  # all parameters (tied ones once)
    moe_layers: int  # decoder layers with routed experts
    shapes: LayerShapes

    @property
    def routed_experts(self) -> int:
        return self.moe_layers * self.shapes.num_experts * self.shapes.expert_params()

    @property
    def always_read(self) -> int:
        """Attention, embeddings, LM head, norms, routers, dense and shared MLPs."""
        return self.total - self.routed_experts

    def read_per_step(self, experts_per_layer: float) -> float:
        """Parameters a decode step must read when `experts_per_layer` distinct routed experts
        are active in each MoE layer (on average): the floor of a weight-streaming step."""
        return self.always_read + self.moe_layers * experts_per_layer * self.shapes.expert_params()


def weight_counts(model) -> WeightCounts:
    """Parameter counts of a REAL_MODELS name or transformers MoE config, from the transformers
    model built on the meta device (no memory, no weights)."""
    import torch
    import transformers as tf

    cfg = real_config(model) if isinstance(model, str) else model
    with torch.device("meta"):
        built = tf.AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in built.parameters())
    moe_layers = sum(1 for name, _ in built.named_modules() if name.endswith(".mlp.experts"))
    if moe_layers == 0:
        raise ValueError(f"{type(cfg).__name__}: no '.mlp.experts' modules found (not an MoE model?)")
    return WeightCounts(total, moe_layers, layer_shapes(cfg))
