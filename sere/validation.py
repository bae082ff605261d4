"""Input checks for the routing transform: each failure names the problem.

Checks that would need the data on the host (NaN/inf in the similarity) are done by
`check_similarity_values`, which callers run once when a similarity is loaded, not on
every routing call: on the GPU it would force a device-to-host synchronisation.
"""
from __future__ import annotations

import numbers

import torch


def check_reroute_args(topk_ids, similarity, select_top_k, threshold) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if not isinstance(similarity, torch.Tensor):
        raise TypeError(f"similarity must be a torch.Tensor, got {type(similarity).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [tokens, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [E, E], got shape {tuple(similarity.shape)}")
    if similarity.shape[0] == 0:
        raise ValueError("similarity must have at least one expert, got shape (0, 0)")
    if not similarity.dtype.is_floating_point:
        raise TypeError(f"similarity must be a floating tensor, got {similarity.dtype}")
    if topk_ids.device != similarity.device:
        raise ValueError(
            f"topk_ids and similarity must be on the same device, got {topk_ids.device} and {similarity.device}"
        )
    if isinstance(select_top_k, bool) or not isinstance(select_top_k, numbers.Integral):
        raise TypeError(f"select_top_k must be an int, got {type(select_top_k).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    if threshold != threshold:
        raise ValueError("threshold must not be NaN")


def check_similarity_values(similarity: torch.Tensor, *, name: str = "similarity") -> None:
    """Reject NaN or inf (a host sync on GPU tensors: call once at load, not per step)."""
    bad = ~torch.isfinite(similarity)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf), "
            f"first at [{i}, {j}] = {similarity[i, j].item()}"
        )
