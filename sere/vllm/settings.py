"""Read SERE settings from a vLLM config: the paper's hf_overrides keys and/or
additional_config={"sere": {...}}.

Two ways in, merged key by key (additional_config wins where both give a key):
  hf_overrides={"architectures": ["Qwen2MoeForCausalLMSERE"], "select_top_k": 1, "threshold": 0.1}
      the paper's interface; only read when the architecture is one of the SERE classes.
  additional_config={"sere": {"select_top_k": 1, "threshold": 0.1, ...}}
      any MoE model. Keys: those of sere.SereConfig (select_top_k, threshold,
      layer_overrides, max_tokens, enabled_layers, backend) plus the vLLM-only ones below.
vLLM-only keys:
  similarity_path  artifact file or folder (default: sere_similarity.safetensors in the model folder)
  sort_slots       order each token's slots by weight before re-routing (default None = auto:
                   off for routers known to return slots sorted, on otherwise)
  record_stats     keep activated-expert statistics (also env SERE_RECORD_STATS=1 or =N for a
                   ring of N steps per layer); read with sere.vllm.router.recorder()
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from sere.config import SereConfig

SERE_ARCH_SUFFIX = "ForCausalLMSERE"
VLLM_KEYS = ("similarity_path", "sort_slots", "record_stats")
PAPER_KEYS = ("select_top_k", "threshold")
DEFAULT_RECORD_CAPACITY = 16384


@dataclass(frozen=True)
class VllmSereSettings:
    config: SereConfig
    similarity_path: str | None = None
    sort_slots: bool | None = None
    record_capacity: int | None = None  # None: no recording
    source: str = ""  # where the settings came from, for messages


def uses_sere_architecture(hf_config) -> bool:
    return any(str(a).endswith(SERE_ARCH_SUFFIX) for a in (getattr(hf_config, "architectures", None) or []))


def read_settings(vllm_config, *, required: bool = False) -> VllmSereSettings | None:
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

    vllm_only = {k: merged.pop(k) for k in VLLM_KEYS if k in merged}
    try:
        config = SereConfig.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise type(e)(f"bad SERE settings from {source}: {e}") from None
    return VllmSereSettings(
        config=config,
        similarity_path=_path_or_none(vllm_only.get("similarity_path")),
        sort_slots=_bool_or_none(vllm_only.get("sort_slots"), "sort_slots"),
        record_capacity=_record_capacity(vllm_only.get("record_stats")),
        source=source,
    )


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


def _path_or_none(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"similarity_path must be a path, got {v!r}")
    return os.fspath(v)


def _bool_or_none(v, name: str) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise TypeError(f"{name} must be true, false or null, got {v!r}")


def _record_capacity(v) -> int | None:
    """record_stats: true / N (capacity) / false; the environment variable also turns it on."""
    env = os.environ.get("SERE_RECORD_STATS", "").strip().lower()
    if v is None and env not in ("", "0", "false", "no"):
        v = True if env in ("1", "true", "yes") else _env_int(env)
    if v is None or v is False:
        return None
    if v is True or (isinstance(v, int) and v == 1):
        return DEFAULT_RECORD_CAPACITY
    if isinstance(v, int) and v > 1:
        return v
    raise ValueError(f"record_stats must be true, false or a step capacity > 1, got {v!r}")


def _env_int(env: str) -> int:
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"SERE_RECORD_STATS must be 0, 1 or a step capacity, got {env!r}") from None
