"""SERE for transformers (5.x) MoE models, through a forward hook on each MoE router.

    import sere.hf
    handle = sere.hf.enable(model, "sere_similarity.safetensors", select_top_k=1, threshold=0.1)
    out = model.generate(input_ids, max_new_tokens=32)
    handle.stats.summary()   # per layer: mean distinct experts before / after, per step in .rows()
    handle.remove()          # the stock model again

transformers 5 MoE blocks call a router module (`*TopKRouter` / `*TopkRouter`, at `mlp.gate`)
that returns (logits, weights, ids) for the flattened tokens, ids [T, k] with T = batch * length.
The hook replaces ids with the re-routed ids; logits and weights are returned untouched, so the
experts module receives the new ids with the old weights. No model code is copied.

Slot order. The contract takes slot 0 = largest weight. Some routers return their top-k unsorted
(DeepSeek-V2 uses topk(sorted=False)), so the hook orders each token's slots by weight
(stable, descending), re-routes in that order, and writes each id back to the slot it came
from: weights and slot positions stay aligned, and with settings that move nothing the ids are
exactly the router's own. Routers of SORTED_ROUTERS return descending weights (torch.topk with
its default sorted=True; tests/test_hf.py checks each), for which that stable sort is the
identity, so by default (`sort_slots=None`) their three extra ops per call are skipped.

Statistics. With record_stats, each router call records one step per layer (distinct experts
before/after, slots re-routed, critical slots, tokens) in a `sere.recorder.ExpertStatsRecorder`
(`handle.stats`). In `generate`, step 0 is the prefill and each later step one decoded token;
`handle.stats.summary(max_tokens=batch)` leaves the prefill out.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from sere.config import SereConfig
from sere.harness.methods import get_method
from sere.recorder import ExpertStatsRecorder
from sere.routing import BACKENDS
from sere.stats import reroute_stats
from sere.validation import check_similarity_values

_ROUTER_CLASS_SUFFIXES = ("TopKRouter", "TopkRouter")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")

# Models that currently carry SERE hooks: model -> handle (one handle per model at a time).
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, SereHandle]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RouterSite:
    """One MoE router found in a model."""

    name: str  # qualified module name, e.g. model.layers.3.mlp.gate
    layer: int  # decoder layer index
    module: torch.nn.Module
    num_experts: int


def find_routers(model: torch.nn.Module) -> list[RouterSite]:
    """Every MoE router of `model`: modules whose class name ends in TopKRouter/TopkRouter, or
    modules named `gate` whose parent block has `experts`. Ordered by layer."""
    sites: dict[int, RouterSite] = {}
    for name, module in model.named_modules():
        if not _looks_like_router(model, name, module):
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise ValueError(f"MoE router {name!r} is not inside a `layers.N` block: cannot tell its layer index")
        layer = int(match.group(1))
        if layer in sites:
            raise ValueError(
                f"layer {layer} has two MoE routers ({sites[layer].name!r}, {name!r}); cannot tell which to use"
            )
        sites[layer] = RouterSite(name, layer, module, _router_expert_count(name, module))
    return [sites[layer] for layer in sorted(sites)]


def _looks_like_router(model, name: str, module) -> bool:
    if type(module).__name__.endswith(_ROUTER_CLASS_SUFFIXES):
        return True
    if name == "gate" or name.endswith(".gate"):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        return hasattr(parent, "experts")
    return False


def _router_expert_count(name: str, module) -> int:
    n = getattr(module, "num_experts", None)
    if isinstance(n, int) and n > 0:
        return n
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    raise ValueError(f"cannot tell how many experts router {name!r} ({type(module).__name__}) has")


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


# Router classes whose top-k weights come back in descending order (torch.topk, sorted=True).
SORTED_ROUTERS = frozenset({"Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "MixtralTopKRouter", "OlmoeTopKRouter"})


def router_returns_sorted(module: torch.nn.Module) -> bool:
    """Whether `module` is a router class known to return its slots sorted by weight."""
    return type(module).__name__ in SORTED_ROUTERS


class SereHandle:
    """What `enable` returns: `remove()` restores the stock model; `stats` holds the recorder
    (None without record_stats); `config` the settings; `layers` the re-routed layers."""

    def __init__(self, model, config: SereConfig, sites: list[RouterSite], stats: ExpertStatsRecorder | None):
        self._model = weakref.ref(model)
        self.config = config
        self.sites = sites
        self.stats = stats
        self._hooks: list[Any] = []

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.sites]

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Take every hook off; the model routes as stock again. Calling it twice is harmless."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        model = self._model()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    def __enter__(self) -> "SereHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"SereHandle({state}, layers={self.layers}, S={self.config.select_top_k}, rho={self.config.threshold})"


def enable(
    model: torch.nn.Module,
    similarity,
    *,
    select_top_k: int,
    threshold: float,
    layers: Iterable[int] | None = None,
    layer_overrides: Mapping[int, Mapping[str, Any]] | None = None,
    backend: str = "auto",
    record_stats: bool = True,
    max_tokens: int | None = None,
    method: str | Callable = "sere",
    method_options: Mapping[str, Any] | None = None,
    recorder: ExpertStatsRecorder | None = None,
    sort_slots: bool | None = None,
) -> SereHandle:
    """Apply SERE to every MoE router of a transformers model; returns a `SereHandle`.

    similarity: an artifact path (read with `sere.artifact.load_similarity`) or a dict
      {layer index: [E, E] tensor}; it must cover every re-routed layer.
    select_top_k, threshold: S and rho; layer_overrides {layer: {"select_top_k"?, "threshold"?}}.
    layers: re-route only these MoE layers (default: all).
    backend: "auto" | "torch" | "reference" | "numba" (see `sere.reroute`).
    max_tokens: leave calls with more tokens than this untouched (e.g. long prefills).
    method: "sere" (default) or another name of `sere.harness.methods.METHODS` (the controls), with
      `method_options` (e.g. {"seed": 1} for "random"), or a callable
      (ids, similarity, S, rho) -> new ids.
    recorder: an `ExpertStatsRecorder` to fill (default: a new one when record_stats).
    sort_slots: order each token's slots by weight before re-routing (True), trust the router's
      order (False), or None: sort unless the router is one of SORTED_ROUTERS.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model in _ACTIVE:
        raise RuntimeError("SERE is already enabled on this model; call remove() on its handle first")
    config = SereConfig(
        select_top_k=select_top_k,
        threshold=threshold,
        layer_overrides=dict(layer_overrides or {}),
        max_tokens=max_tokens,
        enabled_layers=None if layers is None else frozenset(int(i) for i in layers),
        backend=backend,
    )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    transform = _resolve_method(method, method_options, backend)

    all_sites = find_routers(model)
    if not all_sites:
        raise ValueError(
            f"no MoE router found in {type(model).__name__} "
            "(looked for *TopKRouter modules and `gate` modules of blocks with `experts`)"
        )
    moe_layers = [s.layer for s in all_sites]
    _check_layer_names("layers", config.enabled_layers or (), moe_layers)
    _check_layer_names("layer_overrides", config.layer_overrides, moe_layers)
    sites = [s for s in all_sites if config.applies_to(s.layer)]
    if not sites:
        raise ValueError("layers=[] selects no MoE layer; pass None for all of them")

    matrices = _similarity_matrices(similarity, model, all_sites)
    _check_layer_names("similarity", matrices, moe_layers)
    missing = [s.layer for s in sites if s.layer not in matrices]
    if missing:
        raise ValueError(
            f"similarity has no matrix for MoE layer(s) {missing} (it has {sorted(matrices)}); "
            "calibrate those layers or restrict SERE with layers=[...]"
        )
    sims = {s.layer: _checked_matrix(matrices[s.layer], s) for s in sites}

    stats = (recorder if recorder is not None else ExpertStatsRecorder()) if record_stats else None
    handle = SereHandle(model, config, sites, stats)
    for site in sites:
        sort = not router_returns_sorted(site.module) if sort_slots is None else bool(sort_slots)
        hook = _make_router_hook(site, sims[site.layer], config, transform, stats, sort)
        handle._hooks.append(site.module.register_forward_hook(hook))
    _ACTIVE[model] = handle
    return handle


def _resolve_method(method, options, backend: str) -> Callable:
    if callable(method):
        if options:
            raise TypeError("method_options only apply to a method given by name")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a callable, got {type(method).__name__}")
    options = dict(options or {})
    if method == "sere":
        options.setdefault("backend", backend)
    return get_method(method, **options)


def _check_layer_names(what: str, layers: Iterable[int], moe_layers: list[int]) -> None:
    bad = sorted(set(int(i) for i in layers) - set(moe_layers))
    if bad:
        raise ValueError(f"{what} names layer(s) {bad} that have no MoE router; the MoE layers are {moe_layers}")


def _similarity_matrices(similarity, model, sites: list[RouterSite]) -> dict[int, torch.Tensor]:
    if isinstance(similarity, (str, os.PathLike)):
        from sere.artifact import load_similarity

        # The routers found on the live model say which layers and expert count the file must
        # have (this also covers families the artifact's config rules do not know).
        counts = {s.num_experts for s in sites}
        matrices = load_similarity(
            similarity,
            config=getattr(model, "config", None),
            expected_num_experts=counts.pop() if len(counts) == 1 else None,
            expected_layers=[s.layer for s in sites],
        ).matrices
    elif isinstance(similarity, Mapping):
        matrices = similarity
    else:
        raise TypeError(
            f"similarity must be an artifact path or a dict {{layer: [E, E] tensor}}, got {type(similarity).__name__}"
        )
    out = {}
    for key, mat in matrices.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"similarity keys must be int layer indices, got {key!r}")
        out[key] = mat
    return out


def _checked_matrix(mat, site: RouterSite) -> torch.Tensor:
    """The layer's similarity as float32 on the router's device (fp16/bf16 convert exactly,
    and the contract compares in float32), after shape and NaN/inf checks."""
    where = f"similarity for layer {site.layer} ({site.name})"
    if not isinstance(mat, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(mat).__name__}")
    E = site.num_experts
    if tuple(mat.shape) != (E, E):
        raise ValueError(f"{where} has shape {tuple(mat.shape)}, but the router has {E} experts: expected ({E}, {E})")
    if not mat.dtype.is_floating_point:
        raise TypeError(f"{where} must be floating, got {mat.dtype}")
    check_similarity_values(mat, name=where)
    device = next(iter(site.module.parameters()), mat).device
    return mat.detach().to(device=device, dtype=torch.float32).contiguous()


def _make_router_hook(site: RouterSite, sim: torch.Tensor, config: SereConfig, transform, stats, sort_slots: bool):
    setting = config.for_layer(site.layer)
    S, rho = setting.select_top_k, setting.threshold
    E, layer, max_tokens = site.num_experts, site.layer, config.max_tokens

    def hook(module, args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(
                f"SERE expects router {site.name!r} ({type(module).__name__}) to return (logits, weights, ids); "
                f"it returned {type(output).__name__}{f' of length {len(output)}' if isinstance(output, tuple) else ''}"
            )
        logits, weights, ids = output
        if ids.dim() != 2 or weights.shape != ids.shape:
            raise ValueError(
                f"router {site.name!r} returned ids {tuple(ids.shape)} and weights {tuple(weights.shape)}; "
                "expected both [tokens, k]"
            )
        T, k = ids.shape
        untouched = S <= 0 or S >= k or (max_tokens is not None and T > max_tokens)
        if untouched:
            if stats is not None:  # a row per call keeps steps aligned across layers
                stats.record_stats(layer, reroute_stats(ids, ids, E, 0), tokens=T)
            return None  # the router's own output
        if sort_slots:
            new_ids, ids_sorted, new_sorted = reroute_in_weight_order(ids, weights, lambda x: transform(x, sim, S, rho))
        else:  # slots already in contract order
            new_ids = transform(ids, sim, S, rho)
            ids_sorted, new_sorted = ids, new_ids
        if stats is not None:
            stats.record_stats(layer, reroute_stats(ids_sorted, new_sorted, E, S), tokens=T)
        return logits, weights, new_ids

    return hook
