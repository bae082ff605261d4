"""The routing-trace file: router choices recorded from a model, per MoE layer (safetensors, no
pickle). Written by `save_trace`, read and validated by `load_trace`; the format is described in
bench/routing.py, which replays traces in the layer bench, and sere.harness.vllm_routing replays
them inside vLLM.

  tensors   "layer.<i>.topk_ids"      int32 [N, k]   router choices of N tokens at MoE layer i
            "layer.<i>.topk_weights"  float32 [N, k] optional, the matching routing weights
            "layer.<i>.similarity"    float32 [E, E] optional, the layer's calibrated similarity
  metadata  format = "sere-routing-trace", version = "1", num_experts, top_k, model, source
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

TRACE_FORMAT = "sere-routing-trace"
TRACE_VERSION = "1"


@dataclass(frozen=True)
class RoutingTrace:
    """Recorded router choices of one model, per MoE layer."""

    ids: dict[int, torch.Tensor]  # layer -> N, k int32
    weights: dict[int, torch.Tensor]  # layer -> N, k float32 (may be empty)
    similarity: dict[int, torch.Tensor]  # layer -> E, E float32 (may be empty)
    num_experts: int
    top_k: int
    model: str
    source: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.ids)


def save_trace(
    path,
    ids: dict[int, torch.Tensor],
    *,
    num_experts: int,
    model: str,
    source: str,
    weights: dict[int, torch.Tensor] | None = None,
    similarity: dict[int, torch.Tensor] | None = None,
) -> Path:
    """Write a routing trace (see the module docstring for the format); returns the path."""
    from safetensors.torch import save_file

    if not ids:
        raise ValueError("a trace needs at least one layer of ids")
    ks = {int(t.shape[1]) for t in ids.values() if t.dim() == 2}
    if any(t.dim() != 2 for t in ids.values()) or len(ks) != 1:
        raise ValueError(f"every layer's ids must be [N, k] with one k for all layers, got shapes "
                         f"{ {layer: tuple(t.shape) for layer, t in ids.items()} }")
    tensors = {f"layer.{layer}.topk_ids": t.to(torch.int32).contiguous().cpu() for layer, t in ids.items()}
    for layer, w in (weights or {}).items():
        tensors[f"layer.{layer}.topk_weights"] = w.float().contiguous().cpu()
    for layer, s in (similarity or {}).items():
        tensors[f"layer.{layer}.similarity"] = s.float().contiguous().cpu()
    meta = dict(format=TRACE_FORMAT, version=TRACE_VERSION, num_experts=str(int(num_experts)),
                top_k=str(ks.pop()), model=model, source=source)
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


_KEY = re.compile(r"^layer\.(\d+)\.(topk_ids|topk_weights|similarity)$")


def load_trace(path) -> RoutingTrace:
    """Read and validate a routing trace written by `save_trace`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"routing trace {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # not a safetensors file (a pickle, a truncated write, ...)
        raise ValueError(f"{path} is not a safetensors routing trace: {exc}") from exc
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
    if meta.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: trace version {meta.get('version')!r} is not supported (expected {TRACE_VERSION})")
    E, k = int(meta["num_experts"]), int(meta["top_k"])
    parts: dict[str, dict[int, torch.Tensor]] = {"topk_ids": {}, "topk_weights": {}, "similarity": {}}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        parts[m.group(2)][int(m.group(1))] = t
    for layer, t in parts["topk_ids"].items():
        if t.dim() != 2 or t.shape[1] != k or t.shape[0] == 0 or t.dtype.is_floating_point:
            raise ValueError(f"{path}: layer {layer} ids must be a non-empty integer [N, {k}], "
                             f"got {t.dtype} {tuple(t.shape)}")
    for layer, s in parts["similarity"].items():
        if tuple(s.shape) != (E, E):
            raise ValueError(f"{path}: layer {layer} similarity must be [{E}, {E}], got {tuple(s.shape)}")
    if not parts["topk_ids"]:
        raise ValueError(f"{path}: the trace holds no layer ids")
    return RoutingTrace(parts["topk_ids"], parts["topk_weights"], parts["similarity"], E, k,
                        meta.get("model", "?"), meta.get("source", "?"))
