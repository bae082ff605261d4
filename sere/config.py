"""SERE's one configuration type, and the per-layer plan it becomes once the MoE layers are known.

Every entry point parses its input into a `SereConfig` once: the Python call
(`SereConfig(...)`, `sere.hf.enable(...)`'s keywords), the paper's `hf_overrides` and vLLM's
`additional_config={"sere": {...}}` (`SereConfig.from_dict`, via sere.vllm.settings). The
constructor validates every field; `plan(moe_layers)` then checks the layer names against the
model and gives one `LayerPlan` per re-routed layer. Nothing downstream validates again.

Fields (one name each; from_dict also takes the older spellings in ALIASES):
  select_top_k, threshold  S (primary slots per token) and rho (the similarity threshold)
  layer_overrides          {layer: {"select_top_k"?, "threshold"?}}
  layers                   re-route only these MoE layers (None: all of them)
  max_tokens               leave calls with more tokens than this untouched (prefill chunks)
  backend                  "auto" | "reference" | "torch" | "numba" (see sere.reroute)
  method, method_options   the routing transform by name (sere.transforms), with its options
  sort_slots               order each token's slots by weight first: True, False, or None = unless
                           the router is known to return them sorted (sere.rerouter.SORTED_ROUTERS)
  record_stats             False; True (the integration's default recorder); or N > 1, a ring
                           of the last N steps per layer (CUDA-graph safe)
  similarity               the artifact file or folder (None: the integration's default place)
  fuse_topk                vLLM on CUDA: compute a softmax router's top-k and the re-routing in one
                           kernel instead of re-routing after the router's own top-k, in calls of
                           one token (decode at batch 1), merging duplicate slots in the same launch
                           where merge_slots does (off by default: ahead of the two kernels by
                           about 0.8 us per layer there on an H100; see sere.vllm.fused_topk)
  merge_slots              vLLM on CUDA, Triton fused MoE: in calls small enough for vLLM's small-batch
                           path (T k 4 <= E, no expert map) each token's slots that re-routing sent to
                           one expert become one slot with their summed weight (the others id -1,
                           weight 0, which that path answers with zeros), so the expert's weights are
                           read once, not once per slot; the re-route kernel does it in its own launch
                           (sere.routing.merge_duplicate_slots). None (default, "auto"): on wherever it
                           is exact and has the one-launch kernel (CUDA, the numba backend, Triton
                           experts without an expert map, no record_stats or global primary
                           set), off elsewhere; True: on, and an error where it cannot be; False: off
  primary_set              "local" (default): P is this batch's top-S experts; "global": under
                           data-parallel attention, the union over the DP group of every rank's
                           top-S experts, one all-reduce of an E-wide mask per MoE layer call
                           (sere.routing.global_primary_mask; vLLM only, method "sere",
                           torch implementation)
  metadata                 free-form provenance (e.g. what `sere-tune` measured); JSON-like,
                           carried along, ignored by routing and by comparisons
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

BACKENDS = ("auto", "reference", "torch", "numba")
PRIMARY_SETS = ("local", "global")
ALIASES = {"enabled_layers": "layers", "similarity_path": "similarity"}
OVERRIDE_KEYS = ("select_top_k", "threshold")


@dataclass(frozen=True)
class LayerSetting:
    select_top_k: int
    threshold: float


@dataclass(frozen=True)
class LayerPlan:
    """What one MoE layer's re-router does (validated; the re-router trusts it)."""

    layer: int
    select_top_k: int
    threshold: float
    max_tokens: int | None
    primary_set: str = "local"  # "global": the re-router needs the group to take the union over


@dataclass(frozen=True)
class SereConfig:
    select_top_k: int = 1
    threshold: float = 0.1
    layer_overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    max_tokens: int | None = None
    layers: frozenset[int] | None = None
    backend: str = "auto"
    method: str = "sere"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    sort_slots: bool | None = None
    record_stats: bool | int = False
    similarity: str | None = None
    fuse_topk: bool = False
    merge_slots: bool | None = None
    primary_set: str = "local"
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)  # where the settings came from, for messages

    def __post_init__(self):
        _check_setting(self.select_top_k, self.threshold, where="SereConfig")
        if not isinstance(self.layer_overrides, Mapping):
            raise TypeError(f"layer_overrides must be a dict {{layer: {{...}}}}, got {type(self.layer_overrides).__name__}")
        for layer, over in self.layer_overrides.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer_overrides keys must be int layer indices, got {layer!r}")
            if not isinstance(over, Mapping):
                raise TypeError(f"layer_overrides[{layer}] must be a dict, got {type(over).__name__}")
            unknown = set(over) - set(OVERRIDE_KEYS)
            if unknown:
                raise ValueError(f"layer_overrides[{layer}] has unknown key(s) {sorted(unknown)}")
            s = self.for_layer(layer)
            _check_setting(s.select_top_k, s.threshold, where=f"layer_overrides[{layer}]")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", frozenset(_layer_indices(self.layers)))
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if not isinstance(self.method, str) or not self.method:
            raise TypeError(f"method must be a transform name, got {self.method!r}")
        if not isinstance(self.method_options, Mapping):
            raise TypeError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        if self.sort_slots is not None and not isinstance(self.sort_slots, bool):
            raise TypeError(f"sort_slots must be true, false or null, got {self.sort_slots!r}")
        r = self.record_stats
        if not (isinstance(r, bool) or (isinstance(r, int) and r >= 1)):
            raise ValueError(f"record_stats must be true, false or a step capacity > 1, got {r!r}")
        if r == 1 and not isinstance(r, bool):
            object.__setattr__(self, "record_stats", True)  # 1 reads as "on", not a ring of one step
        if self.similarity is not None:
            if not isinstance(self.similarity, (str, os.PathLike)):
                raise TypeError(f"similarity must be an artifact path, got {self.similarity!r}")
            object.__setattr__(self, "similarity", os.fspath(self.similarity))
        if not isinstance(self.fuse_topk, bool):
            raise TypeError(f"fuse_topk must be true or false, got {self.fuse_topk!r}")
        if self.merge_slots is not None and not isinstance(self.merge_slots, bool):
            raise TypeError(f"merge_slots must be true, false or null (auto), got {self.merge_slots!r}")
        if not isinstance(self.primary_set, str) or self.primary_set not in PRIMARY_SETS:
            choices = ", ".join(map(repr, PRIMARY_SETS))
            raise ValueError(f"primary_set must be one of {choices}, got {self.primary_set!r}")
        if self.primary_set == "global" and self.method != "sere":
            raise ValueError(f"primary_set 'global' is SERE's primary set; it needs method 'sere', got {self.method!r}")
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(self.metadata).__name__}")

    # ---- per layer ----------------------------------------------------------------------

    def for_layer(self, layer: int) -> LayerSetting:
        over = self.layer_overrides.get(layer, {})
        # No coercion: "2" for an int must fail validation, not become 2 silently.
        return LayerSetting(over.get("select_top_k", self.select_top_k), over.get("threshold", self.threshold))

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def plan(self, moe_layers: Iterable[int], *, what: str = "") -> dict[int, LayerPlan]:
        """{layer: LayerPlan} for the re-routed MoE layers; `layers` and `layer_overrides` must
        name MoE layers only. `what` prefixes messages (e.g. "SERE (hf_overrides)")."""
        moe = sorted(set(int(i) for i in moe_layers))
        prefix = f"{what} " if what else ""
        for name, named in (("layers", self.layers or ()), ("layer_overrides", self.layer_overrides)):
            bad = sorted(set(named) - set(moe))
            if bad:
                raise ValueError(f"{prefix}{name} names layer(s) {bad} that have no MoE router; the MoE layers are {moe}")
        chosen = [i for i in moe if self.applies_to(i)]
        if not chosen:
            raise ValueError(f"{prefix}layers=[] selects no MoE layer; leave it out (None) for all of them")
        plans = {}
        for i in chosen:
            s = self.for_layer(i)
            plans[i] = LayerPlan(i, int(s.select_top_k), float(s.threshold), self.max_tokens, self.primary_set)
        return plans

    # ---- parsing --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "") -> "SereConfig":
        """From JSON-like settings (hf_overrides, additional_config, a CLI): string layer keys
        are read as ints, lists as sets, the older key names of ALIASES are accepted."""
        if not isinstance(d, Mapping):
            raise TypeError(f"SERE settings must be a dict, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            name = ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"unknown SERE setting(s) {sorted(set(d) - known - set(ALIASES))}; known: {sorted(known)}")
            if name in kw:
                raise ValueError(f"SERE setting {name!r} given twice (as {name!r} and as its alias)")
            kw[name] = value
        if isinstance(kw.get("layer_overrides"), Mapping):
            kw["layer_overrides"] = {int_layer_key(k): v for k, v in kw["layer_overrides"].items()}
        return cls(**kw, source=source)

    def describe(self) -> str:
        return (f"S={self.select_top_k}, threshold={self.threshold}, max_tokens={self.max_tokens}, "
                f"backend={self.backend}, method={self.method}, primary_set={self.primary_set}")


def int_layer_key(k):
    """A layer key as JSON writes it ("2") read as the int it names; anything else unchanged (validation then refuses it)."""
    if isinstance(k, str) and k.strip().lstrip("-").isdigit():
        return int(k)
    return k


def _layer_indices(layers) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a list of layer indices or None, got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers must hold int layer indices, got {i!r}")
        out.append(int(i))
    return out


def _check_setting(select_top_k, threshold, *, where: str) -> None:
    if isinstance(select_top_k, bool) or not isinstance(select_top_k, numbers.Integral):
        raise TypeError(f"{where}: select_top_k must be an int, got {select_top_k!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise TypeError(f"{where}: threshold must be a real number, got {threshold!r}")
