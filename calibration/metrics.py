"""One entry point per way of comparing experts: vectorised, and the pairwise-loop reference.

    from sere.calibration.metrics import similarity_matrix, pairwise_similarity
    sim = similarity_matrix(outputs, "cka", kernel="rbf")   # outputs: E, N, D -> E, E
    ref = pairwise_similarity(outputs, "cka", kernel="rbf") # same, one pair at a time

"substitution" (sere.calibration.substitution) also needs the router's top-k ids and weights,
not only the outputs: it has its own entry points there (substitution_matrix,
calibrate_substitution), and the output-only functions here refuse it by name.
"""
from __future__ import annotations

import torch

from sere.calibration.cka import KERNELS, cka_matrix, cka_pairwise
from sere.calibration.pointwise import cosine_matrix, cosine_pairwise, frobenius_matrix, frobenius_pairwise

OUTPUT_METHODS = ("cka", "cosine", "frobenius")  # computed from expert outputs alone
ROUTED_METHODS = ("substitution",)  # also need the routing (sere.calibration.substitution)
METHODS = OUTPUT_METHODS + ROUTED_METHODS

__all__ = ["KERNELS", "METHODS", "OUTPUT_METHODS", "ROUTED_METHODS", "check_method", "pairwise_similarity", "similarity_matrix"]


def check_method(method: str, kernel: str = "linear") -> None:
    """Accept a method computed from expert outputs alone (what calibrate() and the functions
    below run); a routed method is named with where it is computed."""
    if method in ROUTED_METHODS:
        raise ValueError(
            f"similarity method {method!r} needs the router's top-k ids and weights, not only expert outputs: "
            "use sere.calibration.substitution (calibrate_substitution, substitution_matrix)"
        )
    if method not in METHODS:
        raise ValueError(f"unknown similarity method {method!r}; choose one of {', '.join(OUTPUT_METHODS)}")
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
