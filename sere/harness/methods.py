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
  drop      (weight-level, not in METHODS) the slots truncate removes lose their weight: it
            is set to zero and NOT renormalised, so the token simply goes without those experts'
            contribution. See "drop" below.

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

The drop control. truncate folds a removed slot's weight onto the token's top expert, which for
normalised top-k weights is renormalised top-S routing. drop is the other reading: the slot's
weight becomes 0 and nothing else changes (the token's routed output shrinks by what those
experts contributed; with a substitution similarity below 0, "no stand-in at all" is the fair
rival of re-routing). Its ids are truncate's (the removed slot folds onto the token's own top
expert, so the experts per step are truncate's, and a zero-weighted fold adds nothing to that
expert's output); its weights are `apply_keep_mask(w, keep, renormalize=False)`. An ids-only
transform cannot express it, so "drop" is not a name of METHODS / `get_method` (which would
silently run truncate through an integration that ignores weights): `drop(ids, weights, E, S)`
returns both, in any slot order (the S largest weights are kept, ties in slot order, as
`sere.hf` orders slots), with `drop_reference` its plain-loop oracle. Through the transformers
hook it runs as `with dropping_weights(model, S):` around `sere.hf.enable(..., method="truncate")`
(or `sere.harness.fidelity.fidelity(..., method="truncate")`): the context zeroes the weights, the
truncate transform folds the ids of exactly those slots.

`get_method(name, **options)` is the registry: name -> transform. Each method has a plain-loop
NumPy reference here (`*_reference`) that the tests check it against.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sere.hf import find_routers
from sere.kernels.vectorized import primary_mask
from sere.routing import reroute
from sere.transforms import register_transform
from sere.validation import check_reroute_args

RoutingTransform = Callable[..., torch.Tensor]
METHODS = ("stock", "sere", "random", "truncate", "oea")  # ids-only transforms (get_method)
WEIGHT_METHODS = ("drop",)  # need the router weights too: `drop`, `dropping_weights`


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


# ---- drop: the weight-level control ------------------------------------------------------


def _check_drop_args(topk_ids, topk_weights, num_experts, select_top_k) -> None:
    if not isinstance(topk_ids, torch.Tensor) or not isinstance(topk_weights, torch.Tensor):
        raise TypeError(f"topk_ids and topk_weights must be torch.Tensors, got {type(topk_ids).__name__} "
                        f"and {type(topk_weights).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [tokens, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must have the shape of topk_ids {tuple(topk_ids.shape)}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
    if topk_weights.device != topk_ids.device:
        raise ValueError(f"topk_ids and topk_weights must be on one device, got {topk_ids.device} and {topk_weights.device}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if isinstance(select_top_k, bool) or not isinstance(select_top_k, int):
        raise TypeError(f"select_top_k must be an int, got {type(select_top_k).__name__}")


def drop(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, select_top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drop control: (new ids, new weights). Each token keeps its S largest-weight slots
    (ties in slot order); every other valid slot of a token with a valid id among those S is
    removed: its id folds onto the token's largest-weight id (as truncate folds it) and its weight
    becomes 0, the kept weights unchanged (no renormalisation). Slots may come in any order;
    in contract order (weights descending) the removed slots are exactly truncate's."""
    _check_drop_args(topk_ids, topk_weights, num_experts, select_top_k)
    new_ids, removed = _drop_slots(topk_ids, topk_weights, num_experts, int(select_top_k))
    return new_ids, apply_keep_mask(topk_weights, ~removed, renormalize=False)


def _drop_slots(topk_ids, topk_weights, E: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with the removed slots folded, [T, k] bool removed), in the caller's slot order."""
    if _is_identity(topk_ids, S):
        return topk_ids.clone(), torch.zeros_like(topk_ids, dtype=torch.bool)
    order = topk_weights.argsort(dim=-1, descending=True, stable=True)  # T, k: contract order
    ids_sorted = topk_ids.gather(1, order)  # T, k
    anchor, has_anchor = _own_top_expert(ids_sorted, E, S)  # T, 1 and T, 1
    removed_sorted = torch.zeros_like(ids_sorted, dtype=torch.bool)  # T, k
    sec = ids_sorted[:, S:]  # T, k-S
    removed_sorted[:, S:] = (sec >= 0) & (sec < E) & has_anchor
    new_sorted = torch.where(removed_sorted, anchor.expand_as(ids_sorted), ids_sorted)  # T, k
    removed = torch.empty_like(removed_sorted).scatter_(1, order, removed_sorted)  # T, k, caller's order
    new_ids = torch.empty_like(topk_ids).scatter_(1, order, new_sorted)  # T, k
    return new_ids, removed


class DroppingWeights:
    """What `dropping_weights` returns: forward hooks on every MoE router of a transformers
    model that zero the weights `drop` zeroes; `remove()` (or leaving the `with`) takes them off."""

    def __init__(self, model: torch.nn.Module, select_top_k: int):
        if isinstance(select_top_k, bool) or not isinstance(select_top_k, int):
            raise TypeError(f"select_top_k must be an int, got {type(select_top_k).__name__}")
        sites = find_routers(model)
        if not sites:
            raise ValueError(f"no MoE router found in {type(model).__name__}")
        self.select_top_k = select_top_k
        self._hooks = [s.module.register_forward_hook(self._hook(s.name, s.num_experts)) for s in sites]

    def _hook(self, name: str, num_experts: int):
        S = self.select_top_k

        def hook(module, args, output):
            logits, weights, ids = output
            if _is_identity(ids, S):
                return None
            _check_drop_args(ids, weights, num_experts, S)
            _, removed = _drop_slots(ids, weights, num_experts, S)  # T, k
            new_weights = apply_keep_mask(weights, ~removed, renormalize=False)  # T, k
            # sere.hf re-sorts slots by these weights: a kept weight <= 0 could then sort among
            # the zeroed ones and truncate would fold a different slot than the one zeroed here.
            kept_min = torch.where(removed.any(-1, keepdim=True) & ~removed, weights, torch.ones_like(weights)).min()
            if ids.numel() and bool(kept_min <= 0):  # a host sync: this is evaluation tooling
                raise ValueError(f"router {name!r} returned a non-positive weight for a kept slot; drop needs "
                                 "positive router weights to align with sere.hf's weight order")
            return logits, new_weights, ids

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> "DroppingWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def dropping_weights(model: torch.nn.Module, select_top_k: int) -> DroppingWeights:
    """Zero, in every router's output, the weights of the slots `drop` removes (ids untouched).
    Pair it with the "truncate" transform (`sere.hf.enable` or `sere.harness.fidelity.fidelity`), which
    folds the ids of exactly those slots, so the experts per step are truncate's:

        with dropping_weights(model, 1):
            m = fidelity(model, ref, sim, select_top_k=1, threshold=0.0, method="truncate")

    Either registration order gives the same result (truncate's fold does not change a token's
    S largest weights); create it before `enable` to keep fidelity's experts_before the router's
    own count. The output alone is already drop's without truncate (a zero weight adds nothing),
    but the removed experts would still be counted and computed."""
    return DroppingWeights(model, select_top_k)


# ---- registry ------------------------------------------------------------------------------


def get_method(name: str, **options) -> RoutingTransform:
    """The transform registered as `name` (one of METHODS), bound to its options:
    "sere" takes backend=..., "random" takes seed=... (a stateful `RandomReroute`)."""
    allowed = {"sere": {"backend"}, "random": {"seed"}}.get(name, set())
    if name in WEIGHT_METHODS:
        raise ValueError(f"{name!r} changes router weights, which an ids-only transform cannot: use "
                         f"sere.harness.methods.{name} (ids and weights) or dropping_weights(model, S) with method 'truncate'")
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


def _runtime_factory(name: str):
    """A sere.transforms factory for a comparison method: the re-router passes the backend it
    resolved, which these transforms do not use (they are vectorised torch)."""

    def factory(*, backend: str = "auto", **options) -> RoutingTransform:
        return get_method(name, **options)

    return factory


# The integrations (sere.hf.enable(method=...)) find the controls by name in the runtime's
# registry (the runtime itself registers "sere" and "stock"): registered on import, and
# declared as entry points (pyproject.toml, group sere.routing_methods) so that naming one
# loads this module.
random_factory = _runtime_factory("random")
truncate_factory = _runtime_factory("truncate")
oea_factory = _runtime_factory("oea")
COMPARISON_METHODS = {"random": random_factory, "truncate": truncate_factory, "oea": oea_factory}
for _name, _factory in COMPARISON_METHODS.items():
    register_transform(_name, _factory)


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


def drop_reference(topk_ids, topk_weights, num_experts: int, select_top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: per token, slots in weight order (descending, ties in slot order); the
    first S stay; each later valid slot takes the first valid id of those S and weight 0."""
    ids = np.array(topk_ids, copy=True)  # T, k
    w = np.array(topk_weights, copy=True)  # T, k
    E, S = num_experts, int(select_top_k)
    T, k = ids.shape
    if S <= 0 or S >= k:
        return ids, w
    for t in range(T):
        order = sorted(range(k), key=lambda s: (-w[t, s], s))
        top = _own_top_reference([ids[t, s] for s in order], E, S)
        for s in order[S:]:
            if top is not None and 0 <= ids[t, s] < E:
                ids[t, s] = top
                w[t, s] = 0
    return ids, w
