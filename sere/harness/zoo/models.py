"""The zoo's model definitions: four small MoE causal LMs of the paper's architectures.

Each is a transformers config written here (no hub), small enough that its bf16 checkpoint
stays under 24 MB (the working tree travels to the GPU machine), with fine-grained experts in
the proportions of the real models: Qwen1.5-MoE's 60 experts top-4 plus a shared expert,
DeepSeek-V2-Lite's 64 experts top-6 plus 2 shared after a dense first layer (unsorted
top-k), Qwen3-30B-A3B's 128 experts top-8. Hidden size 256, context 256, a 12288-token
byte-level BPE vocabulary (sere.harness.zoo.corpus) shared by all.
`qwen2_moe_upcycled` has qwen2_moe's config but is made the way Qwen1.5-MoE was: upcycled
from the dense model `qwen2_dense` (sere.harness.zoo.upcycle), then trained as an MoE.

    from sere.harness.zoo.models import ZOO_MODELS, zoo_config
    config = zoo_config("qwen3_moe", vocab_size=12288)
"""
from __future__ import annotations

from typing import Any

ZOO_MODELS = ("qwen2_moe", "deepseek_v2", "qwen3_moe", "qwen2_moe_upcycled")
# Dense models trained only to be upcycled (not zoo members: they have no router).
DENSE_MODELS = ("qwen2_dense",)
# qwen2_dense's FFN is this many expert-sized shards (Qwen-1.8B's FFN made 4 shards of
# Qwen1.5-MoE's expert size; 60 experts = 15 copies of each): FFN intermediate = 4 * 48.
UPCYCLE_SHARDS = 4
MAX_CHECKPOINT_BYTES = 24 * 1024 * 1024
CHECKPOINT_DTYPE = "bfloat16"

# Shared by all: hidden 256, 4 heads of 64, context 256, tied embeddings (they are a large
# share of such a small model), load-balancing loss on as in the real models.
_COMMON: dict[str, Any] = dict(
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    output_router_logits=False,  # training asks for them itself; on in inference it breaks generate with a mask
    router_aux_loss_coef=0.01,
    rms_norm_eps=1e-6,
    attention_dropout=0.0,
)

_QWEN2_MOE: dict[str, Any] = dict(
    num_hidden_layers=3,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=192,
    intermediate_size=192,
    norm_topk_prob=False,
    decoder_sparse_step=1,
)

# name -> (what it mirrors, config keyword arguments)
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    # Qwen1.5-MoE-A2.7B: 60 experts top-4 + one gated shared expert (4 experts wide).
    "qwen2_moe": ("Qwen2MoeConfig", _QWEN2_MOE),
    # The same model upcycled from qwen2_dense (how Qwen1.5-MoE was made from Qwen-1.8B).
    "qwen2_moe_upcycled": ("Qwen2MoeConfig", _QWEN2_MOE),
    # The dense Qwen2 it is upcycled from: FFN = UPCYCLE_SHARDS expert-sized shards.
    "qwen2_dense": (
        "Qwen2Config",
        dict(num_hidden_layers=3, intermediate_size=UPCYCLE_SHARDS * _QWEN2_MOE["moe_intermediate_size"]),
    ),
    # DeepSeek-V2-Lite: dense first layer, 64 experts top-6 + 2 shared, MLA attention;
    # here 1 dense + 3 MoE layers with the same expert counts.
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            num_hidden_layers=4,
            first_k_dense_replace=1,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            moe_intermediate_size=40,
            intermediate_size=512,
            kv_lora_rank=64,
            q_lora_rank=None,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            head_dim=16,
            num_key_value_heads=4,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            routed_scaling_factor=1.0,
        ),
    ),
    # Qwen3-30B-A3B: 128 experts top-8, no shared expert.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=3,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=24,
            intermediate_size=384,
            head_dim=64,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        ),
    ),
}


def zoo_config(name: str, *, vocab_size: int, eos_token_id: int = 0):
    """The transformers config of zoo model `name` (one of ZOO_MODELS or DENSE_MODELS)."""
    import transformers as tf

    if name not in _SPECS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO_MODELS + DENSE_MODELS)}")
    cls_name, spec = _SPECS[name]
    kw = dict(_COMMON)
    if name in DENSE_MODELS:  # no router: drop the MoE keys
        kw = {k: v for k, v in kw.items() if k not in ("output_router_logits", "router_aux_loss_coef")}
    kw.update(spec)
    kw.update(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    return getattr(tf, cls_name)(**kw)


def build_model(name: str, *, vocab_size: int, seed: int = 0, experts_implementation: str | None = None):
    """A freshly initialised zoo model (float32, train mode). experts_implementation: one of
    transformers' expert kernels ("eager", "grouped_mm", ...); None = transformers' default."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    kw = {} if experts_implementation is None or name in DENSE_MODELS else {"experts_implementation": experts_implementation}
    return tf.AutoModelForCausalLM.from_config(zoo_config(name, vocab_size=vocab_size), **kw)


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
