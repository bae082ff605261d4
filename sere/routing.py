"""The SERE routing transform and its backend dispatch.

The contract (every backend agrees on it bit for bit), for one MoE layer and a batch of T tokens:
  topk_ids [T, k] int (slot 0 = largest weight), similarity [E, E] (row = expert being moved,
  column = candidate target), select_top_k S, threshold rho.
  1. Primary set P = valid ids (0 <= id < E) in slots 0..S-1 of all tokens. Invalid ids
     (-1 padding, expert-parallel masking) are never primary and pass through unchanged.
  2. For every valid id e in slots S..k-1: if e is in P it stays. Otherwise p* = argmax over
     p in P of sim[e, p] (ties: smallest p). If sim[e, p*] >= rho, e becomes p*; else e stays
     (a critical expert). Comparisons are in float32 (float32(sim) >= float32(rho)).
  3. Weights are not changed; a token may hold one expert in two slots (fused MoE sums them;
     `merge_duplicate_slots` makes them one slot where the expert kernel allows id -1).
  4. S <= 0, S >= k, or an empty P: output == input.
Output: new ids, same shape and dtype. No host sync, no data-dependent shapes.

`reroute_with_primary` is the same contract with P given as an [E] mask instead of taken from
the batch's slots 0..S-1 (rule 1); with the batch's own P it equals `reroute` bit for bit. It has
a reference and a torch backend; the numba kernels build P themselves and take no mask.

A global primary set (SereConfig.primary_set = "global"). Under data-parallel attention with
expert parallelism every DP rank routes its own batch, so P is per rank. `global_primary_mask`
makes it the union over the DP group of every rank's top-S experts: each rank builds its [E]
0/1 mask from ids[:, :S] (valid ids only), the group sums the masks (one all-reduce per MoE
layer call), and an expert is primary where the sum is > 0. Fixed shape, no host sync, no
.item(): graph-safe wherever the group's all-reduce is. Every rank must call it once per layer
call, with an empty batch (T = 0) too, or the other ranks wait in the collective forever.
"""
from __future__ import annotations

import weakref
from functools import lru_cache

import torch

from sere.config import BACKENDS
from sere.kernels.vectorized import (merge_duplicate_slots_torch, primary_mask as batch_primary_mask, reroute_torch,
                                     reroute_torch_with_primary)
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


def reroute_with_primary(
    topk_ids: torch.Tensor,
    similarity: torch.Tensor,
    select_top_k: int,
    threshold: float,
    primary_mask: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`reroute` with the primary set given: `primary_mask` [E] bool or integer (nonzero =
    primary) on the ids' device, e.g. global_primary_mask below. Slots 0..S-1 stay;
    every valid id in slots S..k-1 outside the mask moves to its most similar expert in the
    mask when that similarity >= rho. backend: "reference", "torch", or "auto" (= torch; the
    numba kernels take no given primary set)."""
    check_reroute_args(topk_ids, similarity, select_top_k, threshold)
    _check_primary_mask(primary_mask, similarity.shape[0], topk_ids.device)
    _check_finite_once(similarity)
    if backend not in ("auto", "reference", "torch"):
        raise ValueError(f"reroute_with_primary runs on backend 'reference' or 'torch' (or 'auto'), not {backend!r}: "
                         "the numba kernels build the primary set themselves")
    return route_with_primary_unchecked(topk_ids, similarity, int(select_top_k), float(threshold), primary_mask,
                                        "reference" if backend == "reference" else "torch")


def route_with_primary_unchecked(
    topk_ids: torch.Tensor, similarity: torch.Tensor, select_top_k: int, threshold: float,
    primary_mask: torch.Tensor, backend: str,
) -> torch.Tensor:
    """`reroute_with_primary` on "reference" or "torch" (any other name runs torch), without
    input checks: the per-call path of a re-router whose inputs were validated when it was built."""
    if backend == "reference":
        from sere.kernels.reference import reroute_with_primary_reference

        out = reroute_with_primary_reference(topk_ids.cpu().numpy(), similarity.float().cpu().numpy(),
                                             select_top_k, threshold, primary_mask.cpu().numpy())
        return torch.from_numpy(out).to(topk_ids.device)
    return reroute_torch_with_primary(topk_ids, similarity, select_top_k, threshold, primary_mask)


def merge_duplicate_slots(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, *,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One slot per expert per token, after re-routing (rule 3 lets a token hold one expert in
    several slots): the first slot of each valid expert keeps the id and takes the weights of all
    its slots, added in slot order in float32; the others become id -1 with weight 0. Returns
    (ids, weights), new tensors of the inputs' dtypes. The MoE output is the same up to rounding
    wherever the expert kernel answers id -1 with zeros (vLLM's fused MoE on its small-batch path,
    T k 4 <= E with no expert map), and the expert is computed once instead of once per slot.
    backend: "reference" (loops), "torch" or "auto" (= torch); the numba kernel merges inside the
    re-route launch (sere.kernels.numba_cuda.reroute_numba_merged)."""
    if not isinstance(topk_ids, torch.Tensor) or not isinstance(topk_weights, torch.Tensor):
        raise TypeError("topk_ids and topk_weights must be torch tensors")
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must be [tokens, k] of one shape, got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be floating, got {topk_weights.dtype}")
    if topk_ids.device != topk_weights.device:
        raise ValueError(f"topk_ids and topk_weights are on different devices: {topk_ids.device}, {topk_weights.device}")
    if backend not in ("auto", "reference", "torch"):
        raise ValueError(f"merge_duplicate_slots runs on backend 'reference' or 'torch' (or 'auto'), not {backend!r}")
    return merge_duplicate_slots_unchecked(topk_ids, topk_weights, int(num_experts), backend)


def merge_duplicate_slots_unchecked(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_duplicate_slots` without input checks (the re-routers' per-call path)."""
    if backend == "reference":
        from sere.kernels.reference import merge_duplicate_slots_reference

        ids, weights = merge_duplicate_slots_reference(topk_ids.cpu().numpy(), topk_weights.float().cpu().numpy(),
                                                       num_experts)
        return (torch.from_numpy(ids).to(topk_ids.device),
                torch.from_numpy(weights).to(device=topk_weights.device, dtype=topk_weights.dtype))
    return merge_duplicate_slots_torch(topk_ids, topk_weights, num_experts)


# 0/1 per rank, summed: exact in float32 up to 2**24 ranks. Floating because vLLM's fastest
# all-reduces (the CUDA custom all-reduce, the CPU shared-memory one) take floating types only.
PRIMARY_MASK_DTYPE = torch.float32


def local_primary_counts(topk_ids: torch.Tensor, num_experts: int, select_top_k: int) -> torch.Tensor:
    """[E] PRIMARY_MASK_DTYPE: 1 where a valid id sits in slots 0..S-1 of any token here, else 0."""
    return batch_primary_mask(topk_ids, num_experts, select_top_k).to(PRIMARY_MASK_DTYPE)  # E


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """`tensor` summed over `group`, one of:
      - a torch.distributed ProcessGroup (None: the default group): torch.distributed.all_reduce,
        in place on `tensor`;
      - an object with its own out-of-place `all_reduce(tensor)`, such as vLLM's GroupCoordinator
        (get_dp_group()): its device communicator, the path vLLM makes safe in CUDA graphs."""
    if group is None or (torch.distributed.is_available() and isinstance(group, torch.distributed.ProcessGroup)):
        # (not getattr(group, "all_reduce"): Dynamo may read no attribute of a ProcessGroup)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
        return tensor
    return group.all_reduce(tensor)


def global_primary_mask(topk_ids: torch.Tensor, num_experts: int, select_top_k: int, group) -> torch.Tensor:
    """[E] bool, the same on every rank of `group` (see all_reduce_sum): the experts in slots
    0..S-1 of any token of any rank. A collective: every rank calls it, T = 0 included."""
    counts = local_primary_counts(topk_ids, num_experts, select_top_k)  # E
    return all_reduce_sum(counts, group) > 0  # E


def _check_primary_mask(mask, num_experts: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"primary_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 1 or mask.shape[0] != num_experts:
        raise ValueError(f"primary_mask must be [E] = [{num_experts}], got shape {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"primary_mask must be bool or integer, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"primary_mask and topk_ids must be on the same device, got {mask.device} and {device}")


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
