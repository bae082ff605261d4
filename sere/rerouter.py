"""The per-layer re-router both integrations use, and the rules they share.

An integration finds its MoE layers, reads its router's (ids, weights) and hands them to the
layer's `LayerRerouter`; the re-router does the rest, the same way for transformers and vLLM:
  1. identity settings (S <= 0, S >= k) or a call with more than max_tokens tokens: the
     router's ids come back as they are (the very tensor);
  2. slots are put in contract order (slot 0 = largest weight) unless the router is known to
     return them so (SORTED_ROUTERS), the transform runs, each id goes back to its slot; where
     the transform has a fused `in_weight_order` (the numba kernel) and no observer needs the
     ids in contract order, that one call does all three;
  3. observers see the call (statistics, traces), in contract order.
Under torch.compile one graph serves every batch size, so there the max_tokens test is a
tensor select instead of a Python branch (no shape guard).

A plan with primary_set "global" takes P as the union over a data-parallel group
(sere.routing.global_primary_mask): the re-router is given the group (`primary_group`),
all-reduces an [E] mask in every call that the settings do not leave alone (a call over
max_tokens too: it still contributes its share, or the other ranks would wait forever) and runs
the contract with that mask on the torch implementation (the reference for backend
"reference"); the transform and the fused numba path are not used. `last_primary` holds the
mask of the call in progress for observers (statistics count critical slots against it).

Observers have one method, `on_route(rerouter, ids_in, new_in, weights_in, skipped)`: ids before
and after the transform in contract order, the weights in that order (only computed when an
observer sets `needs_weights = True`, else None), and `skipped`: True when the call was left
untouched by rule (identity settings, more than max_tokens tokens), a 0-dim bool tensor when a
compiled graph's max_tokens select decides it on the device, else None. `StatsObserver` feeds an
`ExpertStatsRecorder`; a harness can attach its own (sere.harness.vllm_hooks traces calls).
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Protocol

import torch

from sere.config import LayerPlan
from sere.recorder import ExpertStatsRecorder
from sere.routing import global_primary_mask, merge_duplicate_slots_unchecked, route_with_primary_unchecked
from sere.stats import reroute_stats

# The layer-index rule of every integration: module names hold `layers.N`.
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")

# Router classes (matched anywhere in a router's class hierarchy) whose slots come out sorted
# by weight: "any" device (transformers' top-k routers, torch.topk with sorted=True; each is
# checked by tests/test_hf.py), or "cuda" only (vLLM's fused top-k kernels pick the maximum
# k times on CUDA; its CPU path does not promise an order).
SORTED_ROUTERS = {
    "Qwen2MoeTopKRouter": "any",
    "Qwen3MoeTopKRouter": "any",
    "MixtralTopKRouter": "any",
    "OlmoeTopKRouter": "any",
    "FusedTopKRouter": "cuda",
}


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name (`model.layers.3.mlp.gate` -> 3), else None."""
    match = _LAYER_INDEX.search(name)
    return None if match is None else int(match.group(1))


def router_returns_sorted(router, device: torch.device | str | None = None) -> bool:
    """Whether `router` is known to return its slots sorted by weight on `device`."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    for cls in type(router).__mro__:
        where = SORTED_ROUTERS.get(cls.__name__)
        if where == "any" or (where == "cuda" and on_cuda):
            return True
    return False


def reroute_in_weight_order(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply `transform` (ids in contract order -> new ids) to ids whose slots may be in any
    order: sort each token's slots by weight (stable, descending), transform, scatter back.
    Returns (new ids in the caller's slot order, sorted ids, sorted new ids)."""
    order = topk_weights.argsort(dim=-1, descending=True, stable=True)  # T, k
    ids_sorted = topk_ids.gather(1, order)  # T, k
    new_sorted = transform(ids_sorted)  # T, k
    new_ids = torch.empty_like(topk_ids).scatter_(1, order, new_sorted)  # T, k
    return new_ids, ids_sorted, new_sorted


class RoutingObserver(Protocol):
    needs_weights: bool

    def on_route(self, rerouter: "LayerRerouter", ids_in: torch.Tensor, new_in: torch.Tensor,
                 weights_in: torch.Tensor | None, skipped: torch.Tensor | None) -> None: ...


class StatsObserver:
    """One recorder row per call: distinct experts before/after, re-routed and critical slots."""

    needs_weights = False

    def __init__(self, recorder: ExpertStatsRecorder):
        self.recorder = recorder

    def on_route(self, rerouter, ids_in, new_in, weights_in, skipped) -> None:
        tokens = ids_in.shape[0]
        if torch.compiler.is_compiling():  # a Python int would pin the batch size into the graph
            tokens = torch.ones_like(ids_in[:, 0], dtype=torch.int64).sum()
        S = 0 if skipped is True else rerouter.select_top_k  # an untouched call has no critical slots
        # a given P (primary_set global): critical slots against it
        stats = reroute_stats(ids_in, new_in, rerouter.num_experts, S, primary=getattr(rerouter, "last_primary", None))
        if isinstance(skipped, torch.Tensor):  # a compiled max_tokens skip: as an eager one, no critical slots
            stats = dataclasses.replace(stats, critical=stats.critical * ~skipped)
        self.recorder.record_stats(rerouter.layer, stats, tokens=tokens)


class LayerRerouter:
    """SERE for one MoE layer: called with the router's (ids, weights), returns the new ids.

    Built from a validated `LayerPlan`, a similarity already on the model's device as float32
    (sere.artifact.SimilarityArtifact.device_matrices), a transform (sere.transforms) bound to a
    resolved backend, and the slot-order decision. Its attributes may be changed between calls
    of an eager model (test hooks do); compiled graphs keep the values they were built with.
    primary_group: for a plan with primary_set "global", the data-parallel group that P is the
    union over (a torch.distributed ProcessGroup or vLLM's GroupCoordinator, see
    sere.routing.all_reduce_sum); required there, refused for a "local" plan.
    merge_tokens: `route_merged` merges each token's duplicate slots in calls of at most this many
    tokens (None: never); the integration sets it where its expert kernel answers id -1 with zeros.
    """

    def __init__(self, plan: LayerPlan, sim: torch.Tensor, transform, *, sort_slots: bool,
                 backend: str = "auto", observers: list | None = None, primary_group=None,
                 merge_tokens: int | None = None):
        if plan.primary_set == "global" and primary_group is None:
            raise ValueError(f"layer {plan.layer}: primary_set 'global' needs the data-parallel group to take the "
                             "union over (primary_group=); the vLLM plugin passes vLLM's DP group, sere.hf has none")
        if plan.primary_set != "global" and primary_group is not None:
            raise ValueError(f"layer {plan.layer}: a primary_group is given, but the plan's primary_set is "
                             f"{plan.primary_set!r}, not 'global'")
        self.layer = plan.layer
        self.sim = sim  # E, E float32 on the model's device
        self.num_experts = sim.shape[0]
        self.select_top_k = plan.select_top_k
        self.threshold = plan.threshold
        self.max_tokens = plan.max_tokens
        self.sort_slots = sort_slots
        self.backend = backend  # as configured ("auto" ...); the transform holds the resolved one
        self.transform = transform
        self.observers: list = list(observers or [])
        self.primary_group = primary_group
        self.last_primary: torch.Tensor | None = None  # E bool: the global P of the call in progress
        if merge_tokens is not None and (isinstance(merge_tokens, bool) or not isinstance(merge_tokens, int)
                                         or merge_tokens < 1):
            raise ValueError(f"merge_tokens must be a positive int or None, got {merge_tokens!r}")
        self.merge_tokens = merge_tokens

    def _apply(self, ids: torch.Tensor) -> torch.Tensor:
        if self.primary_group is None:
            return self.transform(ids, self.sim, self.select_top_k, self.threshold)
        primary = global_primary_mask(ids, self.num_experts, self.select_top_k, self.primary_group)  # E
        self.last_primary = primary
        backend = "reference" if self.backend == "reference" else "torch"
        return route_with_primary_unchecked(ids, self.sim, self.select_top_k, self.threshold, primary, backend)

    def _join_group(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """A call left alone by max_tokens under a global P: this rank's share of the all-reduce
        still goes in (the other ranks wait for it); its own ids stay as they are."""
        S = self.select_top_k
        ids = topk_ids
        if self.sort_slots:  # the top-S slots by weight, as the contract orders them
            top = topk_weights.argsort(dim=-1, descending=True, stable=True)[:, :S]  # T, S
            ids = topk_ids.gather(1, top)  # T, S
        global_primary_mask(ids, self.num_experts, S, self.primary_group)

    def __call__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        T, k = topk_ids.shape
        S = self.select_top_k
        compiling = torch.compiler.is_compiling()
        self.last_primary = None
        identity = S <= 0 or S >= k  # the same on every rank (settings and k): no collective then
        # A shape test is fine eagerly and under CUDA graphs (one capture per batch size);
        # a Dynamo graph serves every size, so there the test is a tensor select below.
        if not identity and not compiling and self.max_tokens is not None and T > self.max_tokens:
            identity = True
            if self.primary_group is not None:
                self._join_group(topk_ids, topk_weights)
        if identity:
            self._notify(topk_ids, topk_ids, topk_weights, True)
            return topk_ids

        fused = None
        if self.sort_slots and not self.observers and self.primary_group is None:
            fused = getattr(self.transform, "in_weight_order", None)
        if fused is not None:  # one kernel: contract in weight order, ids back in their slots
            new_ids = fused(topk_ids, topk_weights, self.sim, S, self.threshold)
            ids_in = new_in = None  # no observer to show them to
        elif self.sort_slots:
            new_ids, ids_in, new_in = reroute_in_weight_order(topk_ids, topk_weights, self._apply)
        else:
            new_ids = self._apply(topk_ids)  # T, k
            ids_in, new_in = topk_ids, new_ids
        skip = None
        if compiling and self.max_tokens is not None:
            tokens = torch.ones_like(topk_ids[:, 0]).sum()  # T as a tensor, no shape guard
            skip = tokens > self.max_tokens
            new_ids = torch.where(skip, topk_ids, new_ids)
            if new_in is not None:
                new_in = torch.where(skip, ids_in, new_in)
        self._notify(ids_in, new_in, topk_weights, skip)
        return new_ids

    def route_merged(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids), the router's order: the new ids as `__call__` gives them, and in calls of
        at most merge_tokens tokens each token's duplicate slots merged into one
        (sere.routing.merge_duplicate_slots: summed weight, the others id -1 / weight 0). The numba
        transform does both in one launch where no observer needs the ids between the two steps.
        A shape test: fine eagerly and under CUDA graphs; a compiled graph (one for every batch
        size) never merges."""
        T, k = topk_ids.shape
        S = self.select_top_k
        merging = (self.merge_tokens is not None and T <= self.merge_tokens and not torch.compiler.is_compiling()
                   and 0 < S < k and (self.max_tokens is None or T <= self.max_tokens))
        if not merging:
            return topk_weights, self(topk_ids, topk_weights)
        fused = getattr(self.transform, "merged", None)
        if fused is not None and not self.observers and self.primary_group is None:
            self.last_primary = None
            new_ids, new_weights = fused(topk_ids, topk_weights, self.sim, S, self.threshold, self.sort_slots)
            return new_weights, new_ids
        new_ids = self(topk_ids, topk_weights)
        backend = "reference" if self.backend == "reference" else "torch"
        merged_ids, merged_weights = merge_duplicate_slots_unchecked(new_ids, topk_weights, self.num_experts, backend)
        return merged_weights, merged_ids

    def _notify(self, ids_in, new_in, topk_weights, skipped) -> None:
        if not self.observers:
            return
        weights_in = None
        if any(getattr(o, "needs_weights", False) for o in self.observers):
            weights_in = (topk_weights.sort(dim=-1, descending=True, stable=True).values
                          if self.sort_slots else topk_weights)
        for observer in self.observers:
            observer.on_route(self, ids_in, new_in, weights_in, skipped)

    def __repr__(self) -> str:
        global_note = ", primary_set='global'" if self.primary_group is not None else ""
        merge_note = f", merge_tokens={self.merge_tokens}" if self.merge_tokens is not None else ""
        return (f"LayerRerouter(layer={self.layer}, E={self.num_experts}, S={self.select_top_k}, "
                f"rho={self.threshold}, max_tokens={self.max_tokens}, sort_slots={self.sort_slots}, "
                f"backend={self.backend!r}{global_note}{merge_note})")
