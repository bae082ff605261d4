"""Find the MoE layers of a transformers model and run every expert of a layer on its inputs.

    layers = find_moe_layers(model)                  # [MoELayer(index=1, ...), ...]
    outputs = all_expert_outputs(layers[0], x)       # x: T, H -> E, T, H float32

transformers 5.x MoE blocks hold a router `gate` and a fused `experts` module called as
experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]). Asking that module for one
expert per row with weight 1 gives each expert's own output, whatever its weight layout,
activation or kernel (eager loop, grouped_mm, ...): no model code is copied here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

DEFAULT_OUTPUT_ELEMENTS = 1 << 26  # expert outputs computed per call: E * chunk * H at most


@dataclass
class MoELayer:
    index: int  # decoder-layer index
    name: str  # module path of the MoE block, e.g. model.layers.3.mlp
    experts: nn.Module
    num_experts: int


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block with a fused `experts` module, by decoder-layer index: the blocks of the
    routers `sere.hf.find_routers` finds (the one MoE discovery for transformers models)."""
    from sere.hf import find_routers

    found = []
    for site in find_routers(model):
        experts = getattr(site.block, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        num_experts = _num_experts(experts)
        if num_experts is None:
            continue  # a ModuleList of expert MLPs (older layouts): not the fused interface
        found.append(MoELayer(site.layer, site.block_name, experts, num_experts))
    return found


def _num_experts(experts: nn.Module) -> int | None:
    n = getattr(experts, "num_experts", None)
    if isinstance(n, int) and n > 0:
        return n
    w = getattr(experts, "gate_up_proj", None)
    if w is None:
        w = getattr(experts, "up_proj", None)
    if isinstance(w, torch.Tensor) and w.dim() == 3:
        return w.shape[0]
    return None


@torch.no_grad()
def iter_expert_outputs(
    layer: MoELayer, x: torch.Tensor, *, max_elements: int = DEFAULT_OUTPUT_ELEMENTS
) -> Iterator[torch.Tensor]:
    """Every expert's output on token chunks of x [T, H]: yields float32 [E, chunk, H]."""
    e = layer.num_experts
    t, h = x.shape
    step = max(1, max_elements // (e * h))
    expert_ids = torch.arange(e, device=x.device)
    for start in range(0, t, step):
        chunk = x[start : start + step]  # c, H
        c = chunk.shape[0]
        rows = chunk.repeat(e, 1)  # E*c, H: expert-major copies of the chunk
        ids = expert_ids.repeat_interleave(c)[:, None]  # E*c, 1
        weights = torch.ones(e * c, 1, dtype=chunk.dtype, device=chunk.device)  # E*c, 1
        # .forward, not __call__: our own capture hooks on this module must not fire.
        out = layer.experts.forward(rows, ids, weights)  # E*c, H
        yield out.reshape(e, c, h).float()


def all_expert_outputs(layer: MoELayer, x: torch.Tensor, **kw) -> torch.Tensor:
    """Every expert's output on x [T, H], as one float32 [E, T, H] tensor."""
    out = torch.empty(layer.num_experts, x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for chunk in iter_expert_outputs(layer, x, **kw):
        out[:, start : start + chunk.shape[1]] = chunk
        start += chunk.shape[1]
    return out
