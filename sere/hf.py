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

This module only finds the routers and reads their output; the re-routing itself (slot order,
max_tokens, the transform, statistics) is the runtime's one `sere.rerouter.LayerRerouter`, the
same the vLLM plugin uses. Slot order: the contract takes slot 0 = largest weight; routers not
in sere.rerouter.SORTED_ROUTERS (DeepSeek-V2 uses topk(sorted=False)) get each token's slots
ordered by weight first and every id written back to the slot it came from.

Statistics. With record_stats, each router call records one step per layer (distinct experts
before/after, slots re-routed, critical slots, tokens) in a `sere.recorder.ExpertStatsRecorder`
(`handle.stats`; a list per layer, or with record_stats=N a ring of the last N steps). In `generate`, step 0 is the prefill and each later step one decoded token;
`handle.stats.summary(max_tokens=batch)` leaves the prefill out.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from sere.config import SereConfig, int_layer_key
from sere.recorder import ExpertStatsRecorder
from sere.rerouter import LayerRerouter, StatsObserver, layer_index, router_returns_sorted
from sere.routing import resolve_backend
from sere.transforms import get_transform
from sere.validation import check_similarity_values

_ROUTER_CLASS_SUFFIXES = ("TopKRouter", "TopkRouter")

# Models that currently carry SERE hooks: model -> handle (one handle per model at a time).
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, SereHandle]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RouterSite:
    """One MoE router found in a model, with the block that holds it."""

    name: str  # qualified module name, e.g. model.layers.3.mlp.gate
    layer: int  # decoder layer index
    module: torch.nn.Module
    num_experts: int
    block: torch.nn.Module  # the router's parent (the MoE block, e.g. model.layers.3.mlp)
    block_name: str


def find_routers(model: torch.nn.Module) -> list[RouterSite]:
    """Every MoE router of `model`: modules whose class name ends in TopKRouter/TopkRouter, or
    modules named `gate` whose parent block has `experts`. Ordered by layer. The one MoE-layer
    discovery for transformers models (calibration builds on it too)."""
    sites: dict[int, RouterSite] = {}
    for name, module in model.named_modules():
        if not _looks_like_router(model, name, module):
            continue
        layer = layer_index(name)
        if layer is None:
            raise ValueError(f"MoE router {name!r} is not inside a `layers.N` block: cannot tell its layer index")
        if layer in sites:
            raise ValueError(
                f"layer {layer} has two MoE routers ({sites[layer].name!r}, {name!r}); cannot tell which to use"
            )
        block_name = name.rpartition(".")[0]
        block = model.get_submodule(block_name) if block_name else model
        sites[layer] = RouterSite(name, layer, module, _router_expert_count(name, module), block, block_name)
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


class SereHandle:
    """What `enable` returns: `remove()` restores the stock model; `stats` holds the recorder
    (None without record_stats); `config` the settings; `layers` the re-routed layers;
    `rerouters` {layer: LayerRerouter}."""

    def __init__(self, model, config: SereConfig, sites: list[RouterSite], stats: ExpertStatsRecorder | None):
        self._model = weakref.ref(model)
        self.config = config
        self.sites = sites
        self.stats = stats
        self.rerouters: dict[int, LayerRerouter] = {}
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
    select_top_k: int | None = None,
    threshold: float | None = None,
    layers: Iterable[int] | None = None,
    layer_overrides: Mapping[int, Mapping[str, Any]] | None = None,
    backend: str = "auto",
    record_stats: bool | int = True,
    max_tokens: int | None = None,
    method: str | Callable = "sere",
    method_options: Mapping[str, Any] | None = None,
    recorder: ExpertStatsRecorder | None = None,
    sort_slots: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    config: SereConfig | None = None,
) -> SereHandle:
    """Apply SERE to every MoE router of a transformers model; returns a `SereHandle`.

    similarity: an artifact path (read with `sere.artifact.load_similarity`) or a dict
      {layer index: [E, E] tensor}; it must cover every re-routed layer.
    The settings are a `sere.SereConfig`, given whole as `config=` or as these keywords
    (select_top_k and threshold are then required):
    select_top_k, threshold: S and rho; layer_overrides {layer: {"select_top_k"?, "threshold"?}}
      (layer keys may be decimal strings, as JSON writes them: `enable(model, **json.load(f))`
      takes a `sere-tune` sere_tuning.json unchanged).
    layers: re-route only these MoE layers (default: all).
    backend: "auto" | "torch" | "reference" | "numba" (see `sere.reroute`).
    max_tokens: leave calls with more tokens than this untouched (e.g. long prefills).
    method: "sere" (default), another name registered in `sere.transforms` (the harness's
      controls "random", "truncate", "oea"), with `method_options` (e.g. {"seed": 1} for
      "random"), or a callable (ids, similarity, S, rho) -> new ids.
    record_stats: True (a growing list per layer), N (a ring of the last N steps) or False.
    recorder: an `ExpertStatsRecorder` to fill (default: a new one when record_stats).
    sort_slots: order each token's slots by weight before re-routing (True), trust the router's
      order (False), or None: sort unless the router is one of sere.rerouter.SORTED_ROUTERS.
    metadata: provenance carried in the config (SereConfig.metadata), ignored by routing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model in _ACTIVE:
        raise RuntimeError("SERE is already enabled on this model; call remove() on its handle first")
    transform_fn = method if callable(method) else None
    if transform_fn is not None and method_options:
        raise TypeError("method_options only apply to a method given by name")
    if config is None:
        if select_top_k is None or threshold is None:
            raise TypeError("enable needs select_top_k and threshold (or a SereConfig as config=)")
        config = SereConfig(
            select_top_k=select_top_k, threshold=threshold,
            layer_overrides={int_layer_key(k): v for k, v in (layer_overrides or {}).items()},
            max_tokens=max_tokens, layers=None if layers is None else list(layers), backend=backend,
            method="sere" if transform_fn is not None else method, method_options=dict(method_options or {}),
            sort_slots=sort_slots, record_stats=record_stats, metadata=dict(metadata or {}), source="sere.hf.enable",
        )
    elif not isinstance(config, SereConfig):
        raise TypeError(f"config must be a sere.SereConfig, got {type(config).__name__}")
    vllm_only = [name for name, on in (("fuse_topk", config.fuse_topk), ("merge_slots", config.merge_slots is True),
                                       ("primary_set='global'", config.primary_set == "global")) if on]
    if vllm_only:  # they act inside vLLM's MoE path; here they would be ignored without a word
        raise ValueError(f"{', '.join(vllm_only)}: vLLM settings (sere.vllm); sere.hf.enable does not apply them")

    all_sites = find_routers(model)
    if not all_sites:
        raise ValueError(
            f"no MoE router found in {type(model).__name__} "
            "(looked for *TopKRouter modules and `gate` modules of blocks with `experts`)"
        )
    plans = config.plan([s.layer for s in all_sites])
    sites = [s for s in all_sites if s.layer in plans]
    sims = _similarity_on_devices(similarity, model, all_sites, sites)
    if transform_fn is None:
        device = next(iter(sims.values())).device
        transform_fn = get_transform(config.method, backend=resolve_backend(config.backend, device),
                                     **config.method_options)

    stats = None
    if config.record_stats:
        capacity = None if config.record_stats is True else config.record_stats
        stats = recorder if recorder is not None else ExpertStatsRecorder(capacity=capacity)
    observers = [StatsObserver(stats)] if stats is not None else []
    handle = SereHandle(model, config, sites, stats)
    for site in sites:
        sort = not router_returns_sorted(site.module) if config.sort_slots is None else config.sort_slots
        rerouter = LayerRerouter(plans[site.layer], sims[site.layer], transform_fn, sort_slots=sort,
                                 backend=config.backend, observers=observers)
        handle.rerouters[site.layer] = rerouter
        handle._hooks.append(site.module.register_forward_hook(_router_hook(site, rerouter)))
    _ACTIVE[model] = handle
    return handle


def _similarity_on_devices(similarity, model, all_sites: list[RouterSite], sites: list[RouterSite]) -> dict[int, torch.Tensor]:
    """{layer: [E, E] float32 on the router's device} for the re-routed sites, validated once:
    an artifact path by `load_similarity` (against the live routers), a dict here."""
    if isinstance(similarity, (str, os.PathLike)):
        from sere.artifact import load_similarity

        # The routers found on the live model say which layers and expert count the file must
        # have (this also covers families the artifact's config rules do not know).
        counts = {s.num_experts for s in all_sites}
        art = load_similarity(
            similarity,
            config=getattr(model, "config", None),
            expected_num_experts=next(iter(counts)) if len(counts) == 1 else None,
            expected_layers=[s.layer for s in all_sites],
        )
        if len(counts) != 1:  # layers of different sizes: the loader could not check each one
            return {s.layer: _checked_matrix(art.matrices[s.layer], s) for s in sites}
        return {s.layer: art.device_matrices([s.layer], _device_of(s))[s.layer] for s in sites}
    if not isinstance(similarity, Mapping):
        raise TypeError(
            f"similarity must be an artifact path or a dict {{layer: [E, E] tensor}}, got {type(similarity).__name__}"
        )
    for key in similarity:
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"similarity keys must be int layer indices, got {key!r}")
    moe_layers = [s.layer for s in all_sites]
    bad = sorted(set(similarity) - set(moe_layers))
    if bad:
        raise ValueError(f"similarity names layer(s) {bad} that have no MoE router; the MoE layers are {moe_layers}")
    missing = [s.layer for s in sites if s.layer not in similarity]
    if missing:
        raise ValueError(
            f"similarity has no matrix for MoE layer(s) {missing} (it has {sorted(similarity)}); "
            "calibrate those layers or restrict SERE with layers=[...]"
        )
    return {s.layer: _checked_matrix(similarity[s.layer], s) for s in sites}


def _device_of(site: RouterSite) -> torch.device:
    param = next(iter(site.module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _checked_matrix(mat, site: RouterSite) -> torch.Tensor:
    """A user-given layer similarity as float32 on the router's device (fp16/bf16 convert
    exactly, and the contract compares in float32), after shape and NaN/inf checks."""
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


def _router_hook(site: RouterSite, rerouter: LayerRerouter):
    """How transformers routers talk: (logits, weights, ids) out; the ids are replaced."""

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
        new_ids = rerouter(ids, weights)
        return None if new_ids is ids else (logits, weights, new_ids)

    return hook
