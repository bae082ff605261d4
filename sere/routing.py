"""The SERE routing transform and its backend dispatch.

The contract (every backend agrees on it bit for bit), for one MoE layer and a batch of T tokens:
  topk_ids [T, k] int (slot 0 = largest weight), similarity [E, E] (row = expert being moved,
  column = candidate target), select_top_k S, threshold rho.
  1. Primary set P = valid ids (0 <= id < E) in slots 0..S-1 of all tokens. Invalid ids
     (-1 padding, expert-parallel masking) are never primary and pass through unchanged.
  2. For every valid id e in slots S..k-1: if e is in P it stays. Otherwise p* = argmax over
     p in P of sim[e, p] (ties: smallest p). If sim[e, p*] >= rho, e becomes p*; else e stays
     (a critical expert). Comparisons are in float32 (float32(sim) >= float32(rho)).
  3. Weights are not changed; a token may hold one expert in two slots (fused MoE sums them).
  4. S <= 0, S >= k, or an empty P: output == input.
Output: new ids, same shape and dtype. No host sync, no data-dependent shapes.
"""
from __future__ import annotations

import weakref
from functools import lru_cache

import torch

from sere.config import BACKENDS
from sere.kernels.vectorized import reroute_torch
from sere.validation import check_reroute_args, check_similarity_values

@lru_cache(maxsize=None)
def numba_cuda_usable() -> bool:
    """True where the Numba CUDA kernel can run on a real GPU (not the simulator)."""
    if not torch.cuda.is_available():
        return False
    try:
        from sere.kernels import numba_cuda
    except Exception:  # numba or numba-cuda missing or broken
        return False
    return numba_cuda.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "numba" if device.type == "cuda" and numba_cuda_usable() else "torch"
    if backend == "numba" and device.type != "cuda":
        raise ValueError(
            "backend='numba' needs CUDA tensors; use backend='torch' on the CPU "
            "(the Numba kernel runs on the CPU only through the CUDA simulator, see sere.kernels.numba_cuda)"
        )
    return backend


# id(tensor) -> (weakref, version) of similarity tensors already checked for NaN/inf,
# so that the check (a host sync on the GPU) runs once per tensor, not once per call.
_finite_checked: dict[int, tuple[weakref.ref, int]] = {}


def _check_finite_once(similarity: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    if similarity.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # cannot sync inside capture; integrations check at load time
    key = id(similarity)
    seen = _finite_checked.get(key)
    if seen is not None and seen[0]() is similarity and seen[1] == similarity._version:
        return
    check_similarity_values(similarity)
    _finite_checked[key] = (weakref.ref(similarity, lambda _: _finite_checked.pop(key, None)), similarity._version)


def reroute(
    topk_ids: torch.Tensor,
    similarity: torch.Tensor,
    select_top_k: int,
    threshold: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply SERE re-routing to one layer's `topk_ids`; returns new ids (weights are untouched).

    backend: "reference" (plain loops, the oracle), "torch" (vectorised, graph-safe),
    "numba" (one-launch CUDA kernel, a torch custom op), or "auto" (numba on CUDA where
    it works, torch otherwise).
    """
    check_reroute_args(topk_ids, similarity, select_top_k, threshold)
    _check_finite_once(similarity)
    name = resolve_backend(backend, topk_ids.device)
    return route_unchecked(topk_ids, similarity, int(select_top_k), float(threshold), name)


def route_unchecked(
    topk_ids: torch.Tensor, similarity: torch.Tensor, select_top_k: int, threshold: float, backend: str
) -> torch.Tensor:
    """The contract on a resolved backend ("reference", "torch" or "numba"), without input
    checks: the per-call path of the re-routers, whose settings and similarity were
    validated once when they were built. Everyone else calls `reroute`."""
    if backend == "reference":
        from sere.kernels.reference import reroute_reference

        out = reroute_reference(topk_ids.cpu().numpy(), similarity.float().cpu().numpy(), select_top_k, threshold)
        return torch.from_numpy(out).to(topk_ids.device)
    if backend == "numba":
        from sere.kernels.numba_cuda import reroute_numba

        return reroute_numba(topk_ids, similarity, select_top_k, threshold)
    return reroute_torch(topk_ids, similarity, select_top_k, threshold)


def reroute_with_stats(
    topk_ids: torch.Tensor,
    similarity: torch.Tensor,
    select_top_k: int,
    threshold: float,
    *,
    backend: str = "auto",
):
    """`reroute` plus a `RerouteStats` of device tensors (distinct experts before and
    after, slots re-routed, slots kept as critical); no host sync."""
    from sere.stats import reroute_stats

    new_ids = reroute(topk_ids, similarity, select_top_k, threshold, backend=backend)
    return new_ids, reroute_stats(topk_ids, new_ids, similarity.shape[0], int(select_top_k))
