"""Plain-loop reference of the SERE routing contract (the oracle of every test).

Written for clarity, not speed: Python loops over a NumPy copy of the inputs.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import numpy as np


def reroute_reference(topk_ids, sim, select_top_k: int, threshold: float) -> np.ndarray:
    """Return the re-routed ids as a new NumPy array of the input's dtype.

    `topk_ids` [T, k] integer, `sim` [E, E] floating (row = expert being moved,
    column = candidate target). Comparisons are made in float32: the similarity
    converted to float32 (exact for fp16/bf16) against float32(threshold).
    P is this batch's: the valid experts in every token's slots 0..S-1.
    """
    E = np.asarray(sim).shape[0]
    primary = primary_mask_reference(topk_ids, E, select_top_k)  # E
    return reroute_with_primary_reference(topk_ids, sim, select_top_k, threshold, primary)


def primary_mask_reference(topk_ids, num_experts: int, select_top_k: int) -> np.ndarray:
    """[E] bool: the valid experts (0 <= id < E) in slots 0..S-1 of any token (rule 1's P)."""
    ids = np.asarray(topk_ids)  # T, k
    mask = np.zeros(num_experts, dtype=bool)
    for t in range(ids.shape[0]):
        for s in range(min(max(int(select_top_k), 0), ids.shape[1])):
            e = int(ids[t, s])
            if 0 <= e < num_experts:
                mask[e] = True
    return mask


def reroute_with_primary_reference(topk_ids, sim, select_top_k: int, threshold: float, primary) -> np.ndarray:
    """The contract with the primary set given instead of taken from this batch: `primary` [E]
    (bool, or numbers read as nonzero = primary), e.g. the union of every data-parallel rank's
    top-S experts. Slots 0..S-1 stay as they are; every valid id in slots S..k-1 that is not in
    `primary` moves to its most similar expert in `primary` (ties: the smallest) when that
    similarity >= rho, in float32; invalid ids pass through. S <= 0, S >= k or an empty
    `primary`: the output equals the input. With primary = primary_mask_reference(ids, E, S)
    this is reroute_reference."""
    ids = np.array(topk_ids, copy=True)  # T, k
    sim32 = np.asarray(sim, dtype=np.float32)  # E, E
    T, k = ids.shape
    E = sim32.shape[0]
    given = np.asarray(primary).reshape(-1)  # E
    if given.shape[0] != E:
        raise ValueError(f"primary must have one entry per expert ({E}), got {given.shape[0]}")
    rho = np.float32(threshold)
    S = int(select_top_k)
    if S <= 0 or S >= k:
        return ids
    primary_sorted = [p for p in range(E) if given[p]]  # ascending: the first maximum wins ties
    if not primary_sorted:
        return ids
    for t in range(T):
        for s in range(S, k):
            e = int(ids[t, s])
            if not (0 <= e < E) or given[e]:
                continue
            best_p, best_v = -1, None
            for p in primary_sorted:
                v = sim32[e, p]
                if best_v is None or v > best_v:
                    best_p, best_v = p, v
            if best_v >= rho:
                ids[t, s] = best_p
    return ids


def reroute_reference_in_weight_order(topk_ids, topk_weights, sim, select_top_k: int, threshold: float) -> np.ndarray:
    """The contract for routers whose slots are not sorted by weight: each token's slots are put
    in descending weight order (ties: the lower slot first, a stable sort), re-routed as above,
    and every id is written back to the slot it came from. Weights must be finite."""
    ids = np.asarray(topk_ids)  # T, k
    weights = np.asarray(topk_weights, dtype=np.float64)  # T, k (exact for float16/32)
    T, k = ids.shape
    order = [sorted(range(k), key=lambda j: (-weights[t, j], j)) for t in range(T)]  # T lists of k slots
    in_order = np.array([[ids[t, j] for j in order[t]] for t in range(T)], dtype=ids.dtype).reshape(T, k)
    new_in_order = reroute_reference(in_order, sim, select_top_k, threshold)
    out = np.empty_like(ids)
    for t in range(T):
        for rank, j in enumerate(order[t]):
            out[t, j] = new_in_order[t, rank]
    return out


def topk_reroute_reference(router_logits, top_k: int, renormalize: bool, sim, select_top_k: int,
                           threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The router's softmax top-k followed by the contract (what sere.kernels.numba_topk fuses):
    (weights [T, k] float32, ids [T, k] int64). ids: the k largest logits per token, slot 0 the
    largest, ties to the smaller expert; weights: float32 softmax over all experts at those ids,
    divided by their sum when `renormalize`; then reroute_reference on the ids."""
    logits = np.asarray(router_logits, dtype=np.float32)  # T, E
    T, E = logits.shape
    ids = np.zeros((T, top_k), dtype=np.int64)
    weights = np.zeros((T, top_k), dtype=np.float32)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-logits[t, e], e))[:top_k]
        top = logits[t, order[0]]
        exps = np.exp(logits[t] - top)  # float32
        denom = np.float32(exps.sum(dtype=np.float32))
        picked = np.array([exps[e] / denom for e in order], dtype=np.float32)
        if renormalize:
            picked = (picked / picked.sum(dtype=np.float32)).astype(np.float32)
        ids[t] = order
        weights[t] = picked
    return weights, reroute_reference(ids, sim, select_top_k, threshold)


# vLLM's fused MoE skips its token alignment and gives each slot its own block when
# T * k * SMALL_BATCH_SPARSITY <= E (fused_moe._prepare_expert_assignment, vLLM 0.26 and 0.32): the
# path that answers id -1 with zeros, where merging duplicate slots is exact.
SMALL_BATCH_SPARSITY = 4


def merge_duplicate_slots_reference(topk_ids, topk_weights, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """One slot per expert per token (what `merge_slots` does after re-routing): where a token
    holds a valid expert (0 <= id < E) in several slots, its first (lowest) slot keeps the id and
    takes the weights of all of them, added one by one in slot order in float32; the others become
    id -1 with weight 0. Invalid ids are left alone. Returns (ids of the input's dtype, weights in
    the input's dtype). The MoE output is unchanged up to rounding (w1 y + w2 y = (w1 + w2) y)
    wherever the expert kernel answers id -1 with zeros (vLLM's small-batch path)."""
    ids = np.array(topk_ids, copy=True)  # T, k
    weights = np.asarray(topk_weights)
    merged = weights.astype(np.float32)  # T, k (a copy)
    T, k = ids.shape
    for t in range(T):
        for j in range(1, k):
            e = int(ids[t, j])
            if not 0 <= e < num_experts:
                continue
            for i in range(j):
                if ids[t, i] == e:  # the first slot of e (a repeat was set to -1 already)
                    merged[t, i] = np.float32(merged[t, i] + merged[t, j])
                    merged[t, j] = np.float32(0.0)
                    ids[t, j] = -1
                    break
    return ids, merged.astype(weights.dtype)
