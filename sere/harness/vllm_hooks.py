"""Test and bench hooks into the SERE re-routers of an in-process vLLM engine.

    from sere.harness import vllm_hooks
    llm = LLM(..., enforce_eager=True)            # VLLM_ENABLE_V1_MULTIPROCESSING=0
    with vllm_hooks.stock_routing():              # the routers' stock class for one generate
        ...
    with vllm_hooks.overridden(threshold=2.0):    # other S / rho / max_tokens / sort_slots
        ...
    with vllm_hooks.tracing() as calls:           # one RoutingCall per router call
        llm.generate(...)

They act on the re-routers of the last engine built in this process (sere.vllm.router.applied()).
Eager in-process engines only: compiled graphs and CUDA graphs keep the code and values they
were captured with. Nothing in the runtime imports this module; it attaches an observer to the
re-routers (sere.rerouter.RoutingObserver) and swaps classes and attributes from outside.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch


class RoutingCall(NamedTuple):
    """One router call as the re-router saw it: host copies, slots in contract order."""

    layer: int
    ids: torch.Tensor  # T, k: the router's ids
    new_ids: torch.Tensor  # T, k: after SERE
    weights: torch.Tensor  # T, k: the router's weights (non-increasing along k)


def active_rerouters() -> list:
    """The LayerRerouter of every router wrapped by the last SERE engine of this process."""
    from sere.vllm.router import applied

    state = applied()
    return [] if state is None else state.live_rerouters()


def fused_topk_routers() -> list:
    """The wrapped routers that compute their top-k with SERE's fused kernel (fuse_topk)."""
    return [r for r in _wrapped_routers() if getattr(r, "_sere_fused", None) is not None]


def _wrapped_routers() -> list:
    from sere.vllm.router import applied, is_rerouted

    state = applied()
    return [] if state is None else [r for r in state.live_routers() if is_rerouted(r)]


@contextmanager
def stock_routing():
    """Inside the block the wrapped routers run their stock class again (yields them)."""
    from sere.vllm.router import sere_class

    routers = _wrapped_routers()
    for r in routers:
        r.__class__ = type(r).__mro__[1]
    try:
        yield routers
    finally:
        for r in routers:
            r.__class__ = sere_class(type(r))


OVERRIDABLE = ("select_top_k", "threshold", "max_tokens", "sort_slots")


@contextmanager
def overridden(**changes):
    """Temporarily set re-router attributes (OVERRIDABLE) on every active layer."""
    unknown = set(changes) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)}; these can be: {', '.join(OVERRIDABLE)}")
    saved = [(r, {k: getattr(r, k) for k in changes}) for r in active_rerouters()]
    for r, _ in saved:
        for k, v in changes.items():
            setattr(r, k, v)
    try:
        yield [r for r, _ in saved]
    finally:
        for r, old in saved:
            for k, v in old.items():
                setattr(r, k, v)


class _TraceObserver:
    """Copies every call to the host (a sync per call: eager engines only)."""

    def __init__(self, calls: list[RoutingCall]):
        self.calls = calls

    needs_weights = True

    def on_route(self, rerouter, ids_in, new_in, weights_in, skipped) -> None:
        if skipped is True:
            return  # left untouched by rule: nothing re-routed to look at
        if torch.compiler.is_compiling():
            raise RuntimeError("tracing copies ids to the host on every call: use enforce_eager=True")
        self.calls.append(RoutingCall(rerouter.layer, ids_in.cpu(), new_in.cpu(), weights_in.float().cpu()))


@contextmanager
def tracing():
    """Record every router call of the active re-routers inside the block; yields the list."""
    calls: list[RoutingCall] = []
    observer = _TraceObserver(calls)
    rerouters = active_rerouters()
    if not rerouters:
        raise RuntimeError("no SERE re-router is active in this process (build an in-process engine first)")
    for r in rerouters:
        r.observers.append(observer)
    try:
        yield calls
    finally:
        for r in rerouters:
            r.observers.remove(observer)
