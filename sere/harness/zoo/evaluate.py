"""Held-out quality of a zoo model: perplexity, the unigram baseline, and how it routes.

    from sere.harness.zoo.evaluate import heldout_perplexity, unigram_perplexity, routing_entropy
    ppl = heldout_perplexity(model, heldout_ids, seq_len=128)

"Real" means: perplexity far below the unigram model of the same tokenizer (which knows word
frequencies but no context), and routing that is not uniform. Two routing numbers per MoE
layer, both normalised by log(E) so 1.0 is uniform:
  load entropy   entropy of the share of top-k slots each expert receives over the text
                 (the load-balancing loss pushes it towards 1; a collapsed router is near 0);
  router entropy mean entropy of each token's softmax over experts (1.0 = the router cannot
                 tell experts apart; a trained router is well below).
Index letters: N = tokens, W = windows, L = window length, E = experts, k = experts per token.
"""
from __future__ import annotations

import math

import torch


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens (the ragged tail is dropped)."""
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(ids.shape)}")
    W = ids.numel() // seq_len
    if W == 0:
        raise ValueError(f"{ids.numel()} tokens make no window of {seq_len}")
    return ids[: W * seq_len].view(W, seq_len)  # W, L


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows (each window's first
    token is context only)."""
    win = windows(ids, seq_len)  # W, L
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, win.shape[0], batch_size):
        x = win[start : start + batch_size].to(dev)  # B, L
        logits = model(input_ids=x).logits.float()  # B, L, V
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on held-out tokens of the add-one-smoothed unigram model of the training
    tokens: the baseline any context-using LM must beat by far."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # V
    logp = (counts / counts.sum()).log()  # V
    return math.exp(-float(logp[heldout_ids].mean()))


@torch.no_grad()
def routing_entropy(model, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 16) -> dict[int, dict[str, float]]:
    """Per MoE layer: normalised expert-load entropy and mean router entropy (see module doc)."""
    from sere.hf import find_routers

    sites = find_routers(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no MoE router")
    loads = {s.layer: torch.zeros(s.num_experts, dtype=torch.float64) for s in sites}
    router_h = {s.layer: [0.0, 0] for s in sites}

    def make_hook(layer):
        def hook(module, args, output):
            logits, _, topk_ids = output  # N, E and N, k
            loads[layer] += torch.bincount(topk_ids.reshape(-1).cpu(), minlength=loads[layer].numel()).double()
            p = logits.float().softmax(-1)  # N, E
            h = -(p * p.clamp_min(1e-30).log()).sum(-1)  # N
            router_h[layer][0] += float(h.sum())
            router_h[layer][1] += h.numel()

        return hook

    hooks = [s.module.register_forward_hook(make_hook(s.layer)) for s in sites]
    try:
        win = windows(ids, seq_len)
        dev = next(model.parameters()).device
        for start in range(0, win.shape[0], batch_size):
            model(input_ids=win[start : start + batch_size].to(dev))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for s in sites:
        share = loads[s.layer] / loads[s.layer].sum()  # E
        load_h = -float((share * share.clamp_min(1e-30).log()).sum())
        out[s.layer] = {
            "load_entropy": load_h / math.log(s.num_experts),
            "router_entropy": router_h[s.layer][0] / router_h[s.layer][1] / math.log(s.num_experts),
            "max_load_share": float(share.max()),
            "min_load_share": float(share.min()),
        }
    return out
