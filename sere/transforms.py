"""The registry of routing transforms a re-router can apply: name -> factory.

A transform has SERE's call shape, `new_ids = transform(topk_ids, similarity, S, rho)`, with
ids in contract order (slot 0 = largest weight). It may also carry an attribute
`in_weight_order(topk_ids, topk_weights, similarity, S, rho)` that takes slots in any order and
returns ids in those slots (a fused path for routers that do not sort; see sere.rerouter). The runtime registers two:
  sere   the contract (sere.routing), on the backend the re-router resolved at build time;
  stock  the router's ids unchanged (a baseline through the same code path).
Other packages add theirs with `register_transform` (the harness's comparison methods do, in
sere.harness.methods), or declare them as entry points of the group `sere.routing_methods`
(name -> factory), which are loaded the first time an unknown name is asked for; so the runtime
never imports who provides them.

A factory is called as `factory(backend=<resolved backend>, **options)` and returns the
transform; `options` are what the caller passed as method_options, checked by the factory.
"""
from __future__ import annotations

from typing import Callable

import torch

RoutingTransform = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]
ENTRY_POINT_GROUP = "sere.routing_methods"

_FACTORIES: dict[str, Callable[..., RoutingTransform]] = {}
_entry_points_loaded = False


def register_transform(name: str, factory: Callable[..., RoutingTransform], *, replace: bool = False) -> None:
    """Make `name` available to `get_transform` (and so to `method=` of the integrations)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a transform name must be a non-empty str, got {name!r}")
    if name in _FACTORIES and not replace and _FACTORIES[name] is not factory:
        raise ValueError(f"a routing transform named {name!r} is registered already")
    _FACTORIES[name] = factory


def registered() -> list[str]:
    _load_entry_points()
    return sorted(_FACTORIES)


def get_transform(name: str, *, backend: str = "auto", **options) -> RoutingTransform:
    """The transform registered as `name`, bound to `options` (a one-line error otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name or a callable, got {type(name).__name__}")
    if name not in _FACTORIES:
        _load_entry_points()
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing method {name!r}; choose one of {', '.join(registered())}")
    return factory(backend=backend, **options)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _FACTORIES:
            _FACTORIES[ep.name] = ep.load()


def _no_options(name: str, options: dict) -> None:
    if options:
        raise TypeError(f"method {name!r} takes no option(s) {sorted(options)} (it takes none)")


def _sere_factory(*, backend: str = "auto", **options) -> RoutingTransform:
    """The contract on `backend`. On the numba backend the transform also carries
    `in_weight_order(ids, weights, sim, S, rho)`: the same contract for slots that are not sorted
    by weight, in one kernel (no argsort/gather/scatter), and `merged(ids, weights, sim, S, rho,
    in_weight_order)`: the contract then sere.routing.merge_duplicate_slots, in one kernel
    returning (ids, weights); re-routers use them where present."""
    from sere.routing import route_unchecked

    _no_options("sere", options)

    def sere_transform(ids, sim, S, rho):
        return route_unchecked(ids, sim, S, rho, backend)

    if backend == "numba":
        from sere.kernels.numba_cuda import reroute_numba_in_weight_order, reroute_numba_merged

        sere_transform.in_weight_order = reroute_numba_in_weight_order
        sere_transform.merged = reroute_numba_merged
    return sere_transform


def _stock_factory(*, backend: str = "auto", **options) -> RoutingTransform:
    _no_options("stock", options)
    return lambda ids, sim, S, rho: ids.clone()


register_transform("sere", _sere_factory)
register_transform("stock", _stock_factory)
