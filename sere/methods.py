"""Batch-aware routing transforms kept beside SERE for comparison (the accuracy controls).

Every transform has SERE's call shape and contract frame:
    new_ids = method(topk_ids, similarity, select_top_k, threshold)
topk_ids [T, k] (slot 0 = largest weight), similarity [E, E]; new ids have the same shape and
dtype, weights are untouched, invalid ids (outside 0..E-1) pass through, and S <= 0 or S >= k
is the identity. Each method keeps slots 0..S-1 and only ever moves a secondary slot onto an
expert of the primary set P (valid ids in slots 0..S-1 of all tokens), so none can raise the
number of distinct experts. They differ only in where a moved slot goes and which slots move:

  stock     nothing moves.
  sere      slot moves to the most similar primary expert if that similarity >= threshold.
  random    the same slots as SERE move (so the same activated experts), each to a primary
            expert drawn uniformly at random (seeded generator): isolates what the similarity buys.
  truncate  top-S truncation: every secondary slot is dropped.
  oea       Opportunistic Expert Activation (arXiv 2511.02237): keep each token's top k0 = S
            experts; keep a secondary expert only if the batch already loads it (it is in P);
            drop the others. (The paper's piggyback phase can also pick loaded experts outside
            the token's own top-k; with ids-only transforms and untouched weights we keep the
            token's own top-k, as the issue states it.) Similarity and threshold are unused.

How "dropped" is expressed (truncate, oea). Shapes are fixed and weights untouched, so a dropped
slot cannot vanish. We fold it onto the token's own top expert (its first valid id in slots
0..S-1): the slot's weight is added to that expert. Why this and not a sentinel id: every MoE
kernel accepts it (transformers' grouped/batched experts ignore ids >= E only under expert
parallelism, vLLM's fused MoE masks -1 only with an expert map), it keeps the token's total
routing weight (for S = 1 and normalised top-k weights it equals renormalised top-1 routing
exactly), and it makes the controls differ from SERE only in the choice of target: the most
similar primary (sere), a random primary (random), or the token's own top expert (truncate,
oea). A token with no valid id in its first S slots keeps its secondaries. Where an
integration can change weights, `truncation_keep_mask` / `oea_keep_mask` and
`apply_keep_mask` give the literal drop (zero the weight, optionally renormalise).

`get_method(name, **options)` is the registry: name -> transform. Each method has a plain-loop
NumPy reference here (`*_reference`) that the tests check it against.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sere.kernels.vectorized import primary_mask
from sere.routing import reroute
from sere.validation import check_reroute_args

RoutingTransform = Callable[..., torch.Tensor]
METHODS = ("stock", "sere", "random", "truncate", "oea")


# ---- vectorised transforms (no host sync, fixed shapes) ----------------------------------


def stock(topk_ids: torch.Tensor, similarity: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
    """The unmodified routing (a copy), for baselines that go through the same code path."""
    check_reroute_args(topk_ids, similarity, select_top_k, threshold)
    return topk_ids.clone()


def sere_method(
    topk_ids: torch.Tensor, similarity: torch.Tensor, select_top_k: int, threshold: float, *, backend: str = "auto"
) -> torch.Tensor:
    """SERE itself (`sere.reroute`), under the registry's name "sere"."""
    return reroute(topk_ids, similarity, select_top_k, threshold, backend=backend)


def _is_identity(topk_ids: torch.Tensor, select_top_k: int) -> bool:
    return select_top_k <= 0 or select_top_k >= topk_ids.shape[1]


def _own_top_expert(topk_ids: torch.Tensor, num_experts: int, select_top_k: int):
    """Per token: its first valid id in slots 0..S-1 (the fold target) and whether it has one."""
    head = topk_ids[:, :select_top_k]  # T, S
    head_valid = (head >= 0) & (head < num_experts)  # T, S
    first = head_valid.to(torch.int8).argmax(dim=1, keepdim=True)  # T, 1 (first True; 0 if none)
    return head.gather(1, first), head_valid.any(dim=1, keepdim=True)  # T, 1 and T, 1


def random_reroute(
    topk_ids: torch.Tensor,
    similarity: torch.Tensor,
    select_top_k: int,
    threshold: float,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Move the slots SERE would move, each to a primary expert drawn uniformly at random.

    The draws are u ~ U[0,1) of shape [T, k-S] from `generator` (or a fresh generator seeded
    with `seed`); a moved slot goes to the floor(u * |P|)-th primary expert in ascending order.
    """
    check_reroute_args(topk_ids, similarity, select_top_k, threshold)
    S = int(select_top_k)
    if _is_identity(topk_ids, S):
        return topk_ids.clone()
    T, k = topk_ids.shape
    E = similarity.shape[0]
    if generator is None:
        generator = torch.Generator(device=topk_ids.device).manual_seed(seed)
    u = torch.rand(T, k - S, generator=generator, device=topk_ids.device)  # T, k-S
    sec = topk_ids[:, S:]  # T, k-S
    move = reroute(topk_ids, similarity, S, threshold, backend="torch")[:, S:] != sec  # T, k-S
    is_primary = primary_mask(topk_ids, E, S)  # E
    n = is_primary.sum()  # number of primary experts, 0-dim (stays on the device)
    experts = torch.arange(E, device=topk_ids.device)
    ranked = torch.where(is_primary, experts, E).sort().values  # E: the primaries first, ascending
    pick = (u * n).long()  # T, k-S; float32 product, as in the reference
    pick = torch.minimum(pick, (n - 1).clamp(min=0))  # u*n can round up to n
    target = ranked[pick].to(topk_ids.dtype)  # T, k-S
    out = topk_ids.clone()
    out[:, S:] = torch.where(move, target, sec)
    return out


class RandomReroute:
    """`random_reroute` with its own seeded generator per device, advancing between calls
    (so successive layers and steps get fresh draws, reproducibly)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, topk_ids, similarity, select_top_k, threshold):
        dev = topk_ids.device
        gen = self._generators.get(dev)
        if gen is None:
            gen = self._generators[dev] = torch.Generator(device=dev).manual_seed(self.seed)
        return random_reroute(topk_ids, similarity, select_top_k, threshold, generator=gen)

    def __repr__(self) -> str:
        return f"RandomReroute(seed={self.seed})"


def truncate(topk_ids: torch.Tensor, similarity: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
    """Top-S truncation: every valid secondary slot folds onto the token's own top expert."""
    check_reroute_args(topk_ids, similarity, select_top_k, threshold)
    S = int(select_top_k)
    if _is_identity(topk_ids, S):
        return topk_ids.clone()
    E = similarity.shape[0]
    anchor, has_anchor = _own_top_expert(topk_ids, E, S)  # T, 1 and T, 1
    sec = topk_ids[:, S:]  # T, k-S
    drop = (sec >= 0) & (sec < E) & has_anchor  # T, k-S
    out = topk_ids.clone()
    out[:, S:] = torch.where(drop, anchor.expand_as(sec), sec)
    return out


def oea(topk_ids: torch.Tensor, similarity: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
    """Opportunistic Expert Activation with k0 = S: a secondary expert stays if the batch
    loads it anyway (it is primary), otherwise it folds onto the token's own top expert."""
    check_reroute_args(topk_ids, similarity, select_top_k, threshold)
    S = int(select_top_k)
    if _is_identity(topk_ids, S):
        return topk_ids.clone()
    E = similarity.shape[0]
    anchor, has_anchor = _own_top_expert(topk_ids, E, S)  # T, 1 and T, 1
    is_primary = primary_mask(topk_ids, E, S)  # E
    sec = topk_ids[:, S:]  # T, k-S
    sec_valid = (sec >= 0) & (sec < E)
    loaded = is_primary[sec.clamp(0, E - 1).long()]  # T, k-S
    drop = sec_valid & ~loaded & has_anchor
    out = topk_ids.clone()
    out[:, S:] = torch.where(drop, anchor.expand_as(sec), sec)
    return out


# ---- weight-level drop, for integrations that may change weights -------------------------


def truncation_keep_mask(topk_ids: torch.Tensor, select_top_k: int) -> torch.Tensor:
    """[T, k] bool: True for the slots top-S truncation keeps (all, if S <= 0 or S >= k)."""
    T, k = topk_ids.shape
    S = int(select_top_k)
    keep = torch.ones(T, k, dtype=torch.bool, device=topk_ids.device)
    if not _is_identity(topk_ids, S):
        keep[:, S:] = False
    return keep


def oea_keep_mask(topk_ids: torch.Tensor, num_experts: int, select_top_k: int) -> torch.Tensor:
    """[T, k] bool: True for the slots OEA keeps (primary slots and loaded secondaries)."""
    E, S = num_experts, int(select_top_k)
    keep = torch.ones_like(topk_ids, dtype=torch.bool)
    if _is_identity(topk_ids, S):
        return keep
    is_primary = primary_mask(topk_ids, E, S)  # E
    sec = topk_ids[:, S:]  # T, k-S
    sec_valid = (sec >= 0) & (sec < E)
    keep[:, S:] = ~sec_valid | is_primary[sec.clamp(0, E - 1).long()]
    return keep


def apply_keep_mask(topk_weights: torch.Tensor, keep: torch.Tensor, *, renormalize: bool) -> torch.Tensor:
    """Zero the weights of dropped slots; with renormalize, rescale each token's kept weights
    to the total it had before (a token that keeps nothing keeps its weights)."""
    kept = topk_weights * keep  # T, k
    if not renormalize:
        return kept
    total = topk_weights.sum(dim=-1, keepdim=True)  # T, 1
    kept_total = kept.sum(dim=-1, keepdim=True)  # T, 1
    scale = torch.where(kept_total != 0, total / kept_total, torch.ones_like(total))
    return torch.where(kept_total != 0, kept * scale, topk_weights)


# ---- registry ------------------------------------------------------------------------------


def get_method(name: str, **options) -> RoutingTransform:
    """The transform registered as `name` (one of METHODS), bound to its options:
    "sere" takes backend=..., "random" takes seed=... (a stateful `RandomReroute`)."""
    allowed = {"sere": {"backend"}, "random": {"seed"}}.get(name, set())
    if name not in METHODS:
        raise ValueError(f"unknown routing method {name!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"method {name!r} takes no option(s) {sorted(unknown)} (it takes {sorted(allowed) or 'none'})")
    if name == "sere":
        backend = options.get("backend", "auto")
        return lambda ids, sim, S, rho: sere_method(ids, sim, S, rho, backend=backend)
    if name == "random":
        return RandomReroute(seed=options.get("seed", 0))
    return {"stock": stock, "truncate": truncate, "oea": oea}[name]


# ---- plain-loop references (the tests' oracles) --------------------------------------------


def _reference_frame(topk_ids, sim, select_top_k):
    ids = np.array(topk_ids, copy=True)  # T, k
    E = np.asarray(sim).shape[0]
    primary = sorted({int(e) for row in ids for e in row[: max(select_top_k, 0)] if 0 <= e < E})
    return ids, E, primary


def _own_top_reference(row, E, S):
    for e in row[:S]:
        if 0 <= e < E:
            return int(e)
    return None


def random_reroute_reference(topk_ids, sim, select_top_k: int, threshold: float, draws) -> np.ndarray:
    """Plain loops; `draws` [T, k-S] are the uniform numbers the vectorised version drew."""
    from sere.kernels.reference import reroute_reference

    S = int(select_top_k)
    ids, E, primary = _reference_frame(topk_ids, sim, S)
    T, k = ids.shape
    if S <= 0 or S >= k or not primary:
        return ids
    sere_ids = reroute_reference(ids, sim, S, threshold)
    n = np.float32(len(primary))
    for t in range(T):
        for s in range(S, k):
            if sere_ids[t, s] != ids[t, s]:  # a slot SERE moves
                j = min(int(np.float32(draws[t][s - S]) * n), len(primary) - 1)
                ids[t, s] = primary[j]
    return ids


def truncate_reference(topk_ids, sim, select_top_k: int, threshold: float) -> np.ndarray:
    S = int(select_top_k)
    ids, E, _ = _reference_frame(topk_ids, sim, S)
    T, k = ids.shape
    if S <= 0 or S >= k:
        return ids
    for t in range(T):
        top = _own_top_reference(ids[t], E, S)
        for s in range(S, k):
            if top is not None and 0 <= ids[t, s] < E:
                ids[t, s] = top
    return ids


def oea_reference(topk_ids, sim, select_top_k: int, threshold: float) -> np.ndarray:
    S = int(select_top_k)
    ids, E, primary = _reference_frame(topk_ids, sim, S)
    T, k = ids.shape
    if S <= 0 or S >= k:
        return ids
    for t in range(T):
        top = _own_top_reference(ids[t], E, S)
        for s in range(S, k):
            e = int(ids[t, s])
            if top is not None and 0 <= e < E and e not in primary:
                ids[t, s] = top
    return ids
