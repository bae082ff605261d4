"""Upcycle a dense Qwen2 model into a Qwen2-MoE, the way Qwen1.5-MoE-A2.7B was made.

    from sere.harness.zoo.upcycle import upcycle
    moe = upcycle(dense_model, zoo_config("qwen2_moe_upcycled", vocab_size=2048), seed=0)

Qwen1.5-MoE was initialised from the dense Qwen-1.8B (Qwen's blog post on Qwen1.5-MoE): its
FFN was split into fine-grained shards of the expert size, the shards were replicated to fill
the 64 experts, and each copy's parameters were shuffled along the intermediate dimension with
about half of them re-initialised, so that copies of one shard start related but not equal.
Here, with a dense FFN of n_shards * moe_intermediate neurons (sere.harness.zoo.models.UPCYCLE_SHARDS):
  - routed expert e starts as shard (e mod n_shards): the rows of gate_proj / up_proj and the
    columns of down_proj of neurons [s*I, (s+1)*I);
  - each copy gets its own random permutation of its I neurons (which alone changes nothing:
    an FFN is a sum over its neurons), then the first round(reinit_fraction * I) neurons of
    the permuted copy are re-initialised (normal, std = config.initializer_range) - so each
    copy keeps a random half of its shard's neurons, and two copies of one shard share about
    a quarter of them;
  - the shared expert is the whole dense FFN (shared_expert_intermediate_size must equal the
    dense intermediate size); its sigmoid gate starts at zero weight, i.e. 0.5 for every token;
  - attention, embeddings and norms are copied; the router is freshly initialised.
With reinit_fraction = 0 and a token sent to one copy of every shard with weight 1, the routed
experts add up to exactly the dense FFN (tests/test_zoo.py checks this).
Index letters: E = experts, I = expert intermediate, H = hidden, n = shards.
"""
from __future__ import annotations

import torch

DEFAULT_REINIT_FRACTION = 0.5


def shard_of(expert: int, n_shards: int) -> int:
    """Which shard of the dense FFN routed expert `expert` is a copy of."""
    return expert % n_shards


def _check_shapes(dense_cfg, moe_cfg, n_shards: int) -> None:
    I, D = moe_cfg.moe_intermediate_size, dense_cfg.intermediate_size
    problems = []
    if D != n_shards * I:
        problems.append(f"dense intermediate {D} != {n_shards} shards x expert intermediate {I}")
    if moe_cfg.shared_expert_intermediate_size != D:
        problems.append(f"shared expert intermediate {moe_cfg.shared_expert_intermediate_size} != dense intermediate {D}")
    if moe_cfg.num_experts % n_shards:
        problems.append(f"{moe_cfg.num_experts} experts are not a whole number of copies of {n_shards} shards")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if getattr(dense_cfg, key) != getattr(moe_cfg, key):
            problems.append(f"{key}: dense {getattr(dense_cfg, key)} != MoE {getattr(moe_cfg, key)}")
    if getattr(moe_cfg, "decoder_sparse_step", 1) != 1 or getattr(moe_cfg, "mlp_only_layers", []):
        problems.append("every layer must be an MoE layer (decoder_sparse_step 1, no mlp_only_layers)")
    if problems:
        raise ValueError("cannot upcycle: " + "; ".join(problems))


@torch.no_grad()
def upcycle(dense, moe_config, *, n_shards: int | None = None, reinit_fraction: float = DEFAULT_REINIT_FRACTION,
            shuffle: bool = True, seed: int = 0, experts_implementation: str | None = None):
    """A Qwen2MoeForCausalLM (float32, train mode) initialised from the dense Qwen2ForCausalLM
    `dense` as described in the module docstring. n_shards: default dense intermediate /
    expert intermediate. Deterministic for a given seed."""
    import transformers as tf

    if not 0.0 <= reinit_fraction <= 1.0:
        raise ValueError(f"reinit_fraction must be in [0, 1], got {reinit_fraction}")
    dense_cfg = dense.config
    I = moe_config.moe_intermediate_size
    n = n_shards or dense_cfg.intermediate_size // I
    _check_shapes(dense_cfg, moe_config, n)
    torch.manual_seed(seed)  # the fresh router and anything not copied below
    kw = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    moe = tf.AutoModelForCausalLM.from_config(moe_config, **kw).float()
    gen = torch.Generator().manual_seed(seed)
    std = moe_config.initializer_range

    # Everything outside the FFNs has the same name and shape in both models.
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if ".mlp." in key:
            continue
        if key not in moe_state or moe_state[key].shape != value.shape:
            raise ValueError(f"cannot upcycle: dense parameter {key} {tuple(value.shape)} has no match in the MoE")
        moe_state[key].copy_(value.float())

    keep = I - round(reinit_fraction * I)  # neurons of each copy taken from its shard
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        d, m = dense_layer.mlp, moe_layer.mlp
        gate, up, down = d.gate_proj.weight.float(), d.up_proj.weight.float(), d.down_proj.weight.float()  # D,H  D,H  H,D
        m.shared_expert.gate_proj.weight.copy_(gate)
        m.shared_expert.up_proj.weight.copy_(up)
        m.shared_expert.down_proj.weight.copy_(down)
        m.shared_expert_gate.weight.zero_()  # sigmoid(0) = 0.5 for every token at the start
        experts = m.experts  # gate_up_proj E, 2I, H (gate rows then up rows); down_proj E, H, I
        for e in range(moe_config.num_experts):
            s = shard_of(e, n)
            rows = slice(s * I, (s + 1) * I)
            perm = torch.randperm(I, generator=gen) if shuffle else torch.arange(I)  # I
            g, u, dn = gate[rows][perm], up[rows][perm], down[:, rows][:, perm]  # I,H  I,H  H,I
            fresh = slice(0, I - keep)  # after the shuffle, the first neurons start anew
            g[fresh] = torch.randn(g[fresh].shape, generator=gen) * std
            u[fresh] = torch.randn(u[fresh].shape, generator=gen) * std
            dn[:, fresh] = torch.randn(dn[:, fresh].shape, generator=gen) * std
            experts.gate_up_proj[e].copy_(torch.cat([g, u]))  # 2I, H
            experts.down_proj[e].copy_(dn)  # H, I
    return moe.train()


def upcycle_record(moe_config, *, n_shards: int, reinit_fraction: float, shuffle: bool, seed: int) -> dict:
    """What the training log and the card say about the upcycling."""
    I = moe_config.moe_intermediate_size
    return {
        "n_shards": n_shards,
        "copies_per_shard": moe_config.num_experts // n_shards,
        "expert_intermediate": I,
        "reinit_fraction": reinit_fraction,
        "reinit_neurons_per_expert": round(reinit_fraction * I),
        "shuffle": shuffle,
        "seed": seed,
        "shared_expert": "the whole dense FFN, gate weight 0",
        "router": "fresh",
    }
