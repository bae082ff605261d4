"""One entry point per way of comparing experts: vectorised, and the pairwise-loop reference.

    from sere.calibration.metrics import similarity_matrix, pairwise_similarity
    sim = similarity_matrix(outputs, "cka", kernel="rbf")   # outputs: E, N, D -> E, E
    ref = pairwise_similarity(outputs, "cka", kernel="rbf") # same, one pair at a time
"""
from __future__ import annotations

import torch

from sere.calibration.cka import KERNELS, cka_matrix, cka_pairwise
from sere.calibration.pointwise import cosine_matrix, cosine_pairwise, frobenius_matrix, frobenius_pairwise

METHODS = ("cka", "cosine", "frobenius")

__all__ = ["KERNELS", "METHODS", "check_method", "pairwise_similarity", "similarity_matrix"]


def check_method(method: str, kernel: str = "linear") -> None:
    if method not in METHODS:
        raise ValueError(f"unknown similarity method {method!r}; choose one of {', '.join(METHODS)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown CKA kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def similarity_matrix(
    outputs: torch.Tensor, method: str, kernel: str = "linear", *, rbf_features: int | None = None
) -> torch.Tensor:
    """All expert pairs of one layer at once: outputs [E, N, D] -> [E, E] float32 in [0, 1]."""
    check_method(method, kernel)
    if method == "cka":
        return cka_matrix(outputs, kernel, rbf_features=rbf_features)
    return cosine_matrix(outputs) if method == "cosine" else frobenius_matrix(outputs)


def pairwise_similarity(
    outputs: torch.Tensor, method: str, kernel: str = "linear", *, rbf_features: int | None = None, pairs=None
) -> torch.Tensor:
    """The same matrix from a Python loop over expert pairs (the reference; slow)."""
    check_method(method, kernel)
    if method == "cka":
        return cka_pairwise(outputs, kernel, rbf_features=rbf_features, pairs=pairs)
    return cosine_pairwise(outputs, pairs) if method == "cosine" else frobenius_pairwise(outputs, pairs)
