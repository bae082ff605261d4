"""Vectorised PyTorch implementation of the SERE routing contract.

No host synchronisation and no data-dependent shapes, so it runs on CPU and CUDA,
under torch.compile(fullgraph=True) and inside CUDA-graph capture. It costs several
small launches on the GPU; the Numba kernel does the same work in one.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import torch


def expert_mask(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] bool: which valid experts (0 <= id < E) appear anywhere in `ids` (any shape)."""
    E = num_experts
    valid = (ids >= 0) & (ids < E)
    # Invalid ids land in a spare slot E that is dropped afterwards. index_fill_ rather
    # than mask[idx] = True: the latter copies a CPU scalar and breaks graph capture.
    idx = torch.where(valid, ids, torch.full_like(ids, E)).reshape(-1).long()
    mask = torch.zeros(E + 1, dtype=torch.bool, device=ids.device)
    mask.index_fill_(0, idx, True)
    return mask[:E]


def primary_mask(topk_ids: torch.Tensor, num_experts: int, select_top_k: int) -> torch.Tensor:
    """[E] bool: which experts appear in slots 0..S-1 of any token (valid ids only)."""
    return expert_mask(topk_ids[:, :select_top_k], num_experts)  # E


def reroute_torch(
    topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float
) -> torch.Tensor:
    """Return re-routed ids (a new tensor, same shape and dtype as `topk_ids`)."""
    S = select_top_k
    if S <= 0 or S >= topk_ids.shape[1]:
        return topk_ids.clone()
    return reroute_torch_with_primary(topk_ids, sim, S, threshold, primary_mask(topk_ids, sim.shape[0], S))


def reroute_torch_with_primary(
    topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float, primary: torch.Tensor
) -> torch.Tensor:
    """The contract with the primary set given: `primary` [E] bool (or numbers, nonzero =
    primary; e.g. the union over data-parallel ranks, sere.routing.global_primary_mask)
    instead of this batch's slots 0..S-1. Returns re-routed ids (a new tensor, same shape and
    dtype as `topk_ids`); reroute_torch is this with primary = primary_mask(topk_ids, E, S)."""
    T, k = topk_ids.shape
    E = sim.shape[0]
    S = select_top_k
    if S <= 0 or S >= k:
        return topk_ids.clone()

    is_primary = primary if primary.dtype == torch.bool else primary != 0  # E
    sec = topk_ids[:, S:]  # T, k-S
    sec_valid = (sec >= 0) & (sec < E)
    sec_safe = sec.clamp(0, E - 1).long()  # T, k-S
    rows = sim.index_select(0, sec_safe.reshape(-1)).float()  # T*(k-S), E
    rows = rows.masked_fill(~is_primary, float("-inf"))
    # argmax returns the first maximum, so the smallest expert index wins ties.
    best, target = rows.max(dim=-1)  # T*(k-S)
    best = best.view_as(sec)
    target = target.view_as(sec).to(topk_ids.dtype)
    move = (
        sec_valid
        & ~is_primary[sec_safe]
        & (best >= threshold)  # the Python float is cast to float32, as in the contract
        & (best > float("-inf"))  # empty primary set: nothing to move to
    )
    out = topk_ids.clone()
    out[:, S:] = torch.where(move, target, sec)
    return out


def merge_duplicate_slots_torch(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                                num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sere.kernels.reference.merge_duplicate_slots_reference, vectorised over tokens (equal bit
    for bit: each repeat's weight is added to its first slot in slot order, in float32). k small
    launches on the GPU; the numba kernel merges inside the re-route launch instead."""
    T, k = topk_ids.shape
    valid = (topk_ids >= 0) & (topk_ids < num_experts)  # T, k
    same = (topk_ids.unsqueeze(2) == topk_ids.unsqueeze(1)) & valid.unsqueeze(2)  # T, k (slot j), k (slot i)
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_ids.device).tril(-1)  # i < j
    dup = same & earlier  # T, k, k
    repeat = dup.any(-1)  # T, k: slot j holds an expert that an earlier slot holds
    first = dup.to(torch.int8).argmax(-1, keepdim=True)  # T, k, 1: that earlier slot (the first True)
    weights = topk_weights.float()  # T, k
    merged = weights.clone()
    for j in range(1, k):  # in slot order, as the reference adds
        target = first[:, j]  # T, 1
        current = merged.gather(1, target)  # T, 1
        summed = torch.where(repeat[:, j:j + 1], current + weights[:, j:j + 1], current)
        merged.scatter_(1, target, summed)
    merged = torch.where(repeat, torch.zeros_like(merged), merged)
    ids = torch.where(repeat, torch.full_like(topk_ids, -1), topk_ids)
    return ids, merged.to(topk_weights.dtype)
