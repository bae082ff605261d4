"""Held-out quality of a zoo model: perplexity, the unigram baselines, and how it routes.

    from sere.harness.zoo.evaluate import heldout_perplexity, unigram_perplexity, routing_entropy
    ppl = heldout_perplexity(model, heldout_ids, seq_len=128)

"Real" means: perplexity far below the unigram model of the same tokenizer (which knows word
frequencies but no context), and routing that is not uniform. Two routing numbers per MoE
layer, both normalised by log(E) so 1.0 is uniform:
  load entropy   entropy of the share of top-k slots each expert receives over the text
                 (the load-balancing loss pushes it towards 1; a collapsed router is near 0);
  router entropy mean entropy of each token's softmax over experts (1.0 = the router cannot
                 tell experts apart; a trained router is well below).
Across domains: the mutual information between domain and chosen expert (bits; 0 = every
domain routes alike), see domain_expert_information.
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


def text_unigram_perplexity(ids: torch.Tensor) -> float:
    """Perplexity of the text's own unigram model (its token frequencies, fitted on the text
    itself): the best any context-free model can do on it, a stricter baseline than a unigram
    fitted on training text."""
    counts = torch.bincount(ids).double()
    p = counts[counts > 0] / ids.numel()
    return math.exp(-float((p * p.log()).sum()))


@torch.no_grad()
def expert_routing(model, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 16) -> tuple[dict[int, dict], float]:
    """(per MoE layer over the windows of `ids`: {"loads": E top-k slot counts (float64),
    "router_entropy_sum": summed entropy of each token's softmax, "tokens": N, "num_experts": E},
    perplexity of the same pass, as heldout_perplexity computes it)."""
    from sere.hf import find_routers

    sites = find_routers(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no MoE router")
    acc = {s.layer: {"loads": torch.zeros(s.num_experts, dtype=torch.float64), "router_entropy_sum": 0.0, "tokens": 0,
                     "num_experts": s.num_experts} for s in sites}

    def make_hook(layer):
        def hook(module, args, output):
            logits, _, topk_ids = output  # N, E and N, k
            a = acc[layer]
            a["loads"] += torch.bincount(topk_ids.reshape(-1).cpu(), minlength=a["num_experts"]).double()
            p = logits.float().softmax(-1)  # N, E
            a["router_entropy_sum"] += float(-(p * p.clamp_min(1e-30).log()).sum())
            a["tokens"] += p.shape[0]

        return hook

    hooks = [s.module.register_forward_hook(make_hook(s.layer)) for s in sites]
    total, count = 0.0, 0
    try:
        win = windows(ids, seq_len)
        dev = next(model.parameters()).device
        for start in range(0, win.shape[0], batch_size):
            x = win[start : start + batch_size].to(dev)  # B, L
            logits = model(input_ids=x).logits.float()  # B, L, V
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    finally:
        for h in hooks:
            h.remove()
    return acc, math.exp(total / count)


def _entropy(share: torch.Tensor) -> float:
    return -float((share * share.clamp_min(1e-30).log()).sum())


def layer_entropies(passes) -> dict[str, float]:
    """One MoE layer's normalised load entropy, mean router entropy and max / min load share
    (see module doc), pooled over one or more expert_routing entries of that layer."""
    passes = list(passes)
    loads = sum(a["loads"] for a in passes)  # E
    share = loads / loads.sum()  # E
    log_e = math.log(passes[0]["num_experts"])
    return {
        "load_entropy": _entropy(share) / log_e,
        "router_entropy": sum(a["router_entropy_sum"] for a in passes) / sum(a["tokens"] for a in passes) / log_e,
        "max_load_share": float(share.max()),
        "min_load_share": float(share.min()),
    }


def routing_entropy(model, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 16) -> dict[int, dict[str, float]]:
    """Per MoE layer: normalised expert-load entropy and mean router entropy (see module doc)."""
    return {layer: layer_entropies([a]) for layer, a in expert_routing(model, ids, seq_len, batch_size)[0].items()}


def domain_expert_information(loads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mutual information between domain and chosen expert for one layer, from each domain's
    top-k slot counts {domain: E}, domains weighted equally (p(d) = 1/D):
    I(D; X) = H(X) - sum_d p(d) H(X | d), in bits, with the two bounds it is read against
    (log2 D: the expert names the domain; 0: every domain routes alike) and the mean load
    entropy of a domain (low = a domain uses few experts)."""
    shares = torch.stack([c / c.sum() for c in loads.values()])  # D, E
    D, E = shares.shape
    h_mix = _entropy(shares.mean(0))
    h_cond = sum(_entropy(s) for s in shares) / D
    return {"mi_bits": (h_mix - h_cond) / math.log(2), "max_bits": math.log2(min(D, E)),
            "domain_load_entropy": h_cond / math.log(E)}
