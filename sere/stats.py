"""Routing statistics as device tensors (no host sync): what SERE did to one batch.

Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sere.kernels.vectorized import expert_mask, primary_mask


@dataclass(frozen=True)
class RerouteStats:
    """0-dim int64 tensors on the ids' device. Read them with `.item()` when a sync is fine."""

    experts_before: torch.Tensor  # distinct valid experts in the input ids
    experts_after: torch.Tensor  # distinct valid experts in the output ids
    rerouted: torch.Tensor  # slots whose id changed
    critical: torch.Tensor  # secondary slots kept because the best similarity was under rho

    def as_dict(self) -> dict[str, int]:
        """Host copy of every field (one sync)."""
        vals = torch.stack([self.experts_before, self.experts_after, self.rerouted, self.critical]).tolist()
        return dict(zip(("experts_before", "experts_after", "rerouted", "critical"), vals))


def distinct_experts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """0-dim int64: how many distinct valid expert ids appear anywhere in `ids`."""
    return expert_mask(ids, num_experts).sum()


def reroute_stats(
    topk_ids: torch.Tensor, new_ids: torch.Tensor, num_experts: int, select_top_k: int
) -> RerouteStats:
    """Statistics of one re-routing call, computed from its input and output ids."""
    T, k = topk_ids.shape
    E, S = num_experts, select_top_k
    rerouted = (new_ids != topk_ids).sum()
    if 0 < S < k:
        is_primary = primary_mask(topk_ids, E, S)  # E
        sec = topk_ids[:, S:]  # T, k-S
        sec_valid = (sec >= 0) & (sec < E)
        not_primary = sec_valid & ~is_primary[sec.clamp(0, E - 1).long()]
        # A secondary expert outside P that did not move is critical, unless P is empty
        # (then nothing could move and the call was the identity by rule 4).
        critical = (not_primary & (new_ids[:, S:] == sec)).sum() * is_primary.any()
    else:
        critical = torch.zeros((), dtype=torch.int64, device=topk_ids.device)
    return RerouteStats(
        experts_before=distinct_experts(topk_ids, E),
        experts_after=distinct_experts(new_ids, E),
        rerouted=rerouted,
        critical=critical,
    )
