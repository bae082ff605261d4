"""Read SERE settings from a vLLM config: the paper's hf_overrides keys and/or
additional_config={"sere": {...}}, parsed once into a `sere.SereConfig`.

Two ways in, merged key by key (additional_config wins where both give a key):
  hf_overrides={"architectures": ["Qwen2MoeForCausalLMSERE"], "select_top_k": 1, "threshold": 0.1}
      the paper's interface; only read when the architecture is one of the SERE classes.
  additional_config={"sere": {"select_top_k": 1, "threshold": 0.1, ...}}
      any MoE model; keys: the fields of sere.SereConfig (select_top_k, threshold,
      layer_overrides, max_tokens, layers, backend, method, method_options, sort_slots,
      record_stats, similarity), and the older names enabled_layers and similarity_path.
In vLLM: similarity defaults to sere_similarity.safetensors in the model folder; record_stats
(also env SERE_RECORD_STATS=1, or =N for a ring of N steps per layer) keeps activated-expert
statistics in a ring of DEFAULT_RECORD_CAPACITY steps per layer (CUDA-graph safe), read with
sere.vllm.router.recorder().
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from sere.config import SereConfig

SERE_ARCH_SUFFIX = "ForCausalLMSERE"
PAPER_KEYS = ("select_top_k", "threshold")
DEFAULT_RECORD_CAPACITY = 16384


def uses_sere_architecture(hf_config) -> bool:
    return any(str(a).endswith(SERE_ARCH_SUFFIX) for a in (getattr(hf_config, "architectures", None) or []))


def read_settings(vllm_config, *, required: bool = False) -> SereConfig | None:
    """The SERE settings of this engine, or None when SERE is not asked for.

    required=True (the SERE model classes): the paper's keys must be somewhere."""
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    extra = _additional_sere(vllm_config)
    paper = uses_sere_architecture(hf_config) or required
    if extra is None and not paper:
        return None

    merged: dict[str, Any] = {}
    sources = []
    if paper:
        for key in PAPER_KEYS:
            if hasattr(hf_config, key):
                merged[key] = getattr(hf_config, key)
        sources.append("hf_overrides")
    if extra is not None:
        merged.update(extra)
        sources.append('additional_config["sere"]')
    source = " + ".join(sources)
    if paper:
        missing = [k for k in PAPER_KEYS if k not in merged]
        if missing:
            archs = getattr(hf_config, "architectures", None)
            raise ValueError(
                f"SERE architecture {archs} needs {missing} in hf_overrides (the paper's interface: "
                'hf_overrides={"architectures": [...], "select_top_k": 1, "threshold": 0.1}) '
                'or in additional_config={"sere": {...}}'
            )
    if merged.get("record_stats") is None:
        merged.pop("record_stats", None)
        env = _record_env()
        if env is not None:
            merged["record_stats"] = env
    try:
        return SereConfig.from_dict(merged, source=source)
    except (TypeError, ValueError) as e:
        raise type(e)(f"bad SERE settings from {source}: {e}") from None


def record_capacity(config: SereConfig) -> int | None:
    """Steps per layer the engine's recorder keeps (a ring), or None for no recording."""
    if config.record_stats is False:
        return None
    return DEFAULT_RECORD_CAPACITY if config.record_stats is True else config.record_stats


def _additional_sere(vllm_config) -> dict[str, Any] | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, Mapping) or "sere" not in extra:
        return None
    sere = extra["sere"]
    if sere is None:
        return None
    if not isinstance(sere, Mapping):
        raise TypeError(f'additional_config["sere"] must be a dict of SERE settings, got {type(sere).__name__}')
    return dict(sere)


def _record_env() -> bool | int | None:
    """SERE_RECORD_STATS: unset/0/false -> None (not asked), 1/true -> True, N -> N."""
    env = os.environ.get("SERE_RECORD_STATS", "").strip().lower()
    if env in ("", "0", "false", "no"):
        return None
    if env in ("1", "true", "yes"):
        return True
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"SERE_RECORD_STATS must be 0, 1 or a step capacity, got {env!r}") from None
