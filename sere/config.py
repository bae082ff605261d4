"""SERE settings: S (primary slots per token) and rho (threshold), with per-layer overrides."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class LayerSetting:
    select_top_k: int
    threshold: float


@dataclass(frozen=True)
class SereConfig:
    """select_top_k S and threshold rho for every MoE layer, optionally overridden per layer.

    layer_overrides maps a layer index to {"select_top_k": .., "threshold": ..} (either key may
    be left out). max_tokens: skip re-routing for batches holding more tokens than this (V1
    engines mix prefill chunks into decode steps; there the primary set fills up anyway).
    enabled_layers: restrict SERE to these layer indices (None = every MoE layer).
    """

    select_top_k: int = 1
    threshold: float = 0.1
    layer_overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    max_tokens: int | None = None
    enabled_layers: frozenset[int] | None = None
    backend: str = "auto"

    def __post_init__(self):
        _check_setting(self.select_top_k, self.threshold, where="SereConfig")
        for layer, over in self.layer_overrides.items():
            unknown = set(over) - {"select_top_k", "threshold"}
            if unknown:
                raise ValueError(f"layer_overrides[{layer}] has unknown key(s) {sorted(unknown)}")
            s = self.for_layer(layer)
            _check_setting(s.select_top_k, s.threshold, where=f"layer_overrides[{layer}]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens!r}")
        if self.enabled_layers is not None:
            object.__setattr__(self, "enabled_layers", frozenset(int(i) for i in self.enabled_layers))

    def for_layer(self, layer: int) -> LayerSetting:
        over = self.layer_overrides.get(layer, {})
        # No coercion: "2" for an int must fail validation, not become 2 silently.
        return LayerSetting(over.get("select_top_k", self.select_top_k), over.get("threshold", self.threshold))

    def applies_to(self, layer: int) -> bool:
        return self.enabled_layers is None or layer in self.enabled_layers

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SereConfig":
        known = {"select_top_k", "threshold", "layer_overrides", "max_tokens", "enabled_layers", "backend"}
        unknown = set(d) - known - {"similarity_path"}
        if unknown:
            raise ValueError(f"unknown SERE setting(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = {k: v for k, v in d.items() if k in known}
        if "layer_overrides" in kw:
            kw["layer_overrides"] = {int(k): v for k, v in kw["layer_overrides"].items()}
        return cls(**kw)


def _check_setting(select_top_k, threshold, *, where: str) -> None:
    if isinstance(select_top_k, bool) or not isinstance(select_top_k, numbers.Integral):
        raise TypeError(f"{where}: select_top_k must be an int, got {select_top_k!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise TypeError(f"{where}: threshold must be a real number, got {threshold!r}")
