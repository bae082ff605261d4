"""The reroute kernels as the torch custom ops `torch.ops.sere.reroute` and
`torch.ops.sere.reroute_in_weight_order` (routers whose slots are not sorted by weight), and
`reroute_numba` / `reroute_numba_in_weight_order`, the entries that skip the dispatcher on
plain eager tensors; `torch.ops.sere.reroute_merged` / `reroute_numba_merged`: re-routing and the
merge of each token's duplicate slots (new ids and weights) in one launch.
"""
from __future__ import annotations

import torch

from sere.kernels.numba_launch import TORCH_SIM_KIND, launch_reroute, launch_reroute_merged

_TORCH_ID_TYPES = (torch.int32, torch.int64)


def _check_torch_inputs(topk_ids: torch.Tensor, sim: torch.Tensor) -> None:
    if not topk_ids.is_cuda or not sim.is_cuda:
        raise ValueError(f"reroute_numba needs CUDA tensors, got {topk_ids.device} and {sim.device}")
    if topk_ids.device != sim.device:
        raise ValueError(f"topk_ids and sim are on different devices: {topk_ids.device}, {sim.device}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in _TORCH_ID_TYPES:
        raise TypeError(f"reroute_numba supports int32 and int64 ids, got {topk_ids.dtype}")
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be square [E, E], got shape {tuple(sim.shape)}")
    if topk_ids.numel() >= 2**31 or sim.numel() >= 2**31:
        raise ValueError("reroute_numba indexes with 32-bit counts: T*k and E*E must be < 2**31")


def _reroute_eager(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
    _check_torch_inputs(topk_ids, sim)
    ids = topk_ids.contiguous()  # T, k (a copy only for strided input)
    if sim.dtype not in TORCH_SIM_KIND:
        if not sim.dtype.is_floating_point:
            raise TypeError(f"sim must be floating, got {sim.dtype}")
        sim = sim.float()  # e.g. float64: the contract compares in float32 anyway (extra copy)
    sim = sim.contiguous()  # E, E
    out = torch.empty_like(ids)  # T, k
    launch_reroute(ids, sim, out, select_top_k, threshold)
    return out


@torch.library.custom_op("sere::reroute", mutates_args=())
def reroute_op(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
    """torch.ops.sere.reroute: the one-launch kernel as an opaque op for torch.compile / export."""
    return _reroute_eager(topk_ids, sim, select_top_k, threshold)


@reroute_op.register_fake
def _reroute_fake(topk_ids, sim, select_top_k, threshold):
    return torch.empty_like(topk_ids, memory_format=torch.contiguous_format)


def reroute_numba(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
    """Re-routed ids (a new tensor, same shape and dtype) from the one-launch kernel.

    Eagerly on plain tensors it launches directly (the dispatcher round trip of a custom op
    costs microseconds per call); under torch.compile, export or fake tensors it goes through
    the registered op `torch.ops.sere.reroute`. Either way: torch's current stream, no sync.
    """
    if type(topk_ids) is torch.Tensor and type(sim) is torch.Tensor and not torch.compiler.is_compiling():
        return _reroute_eager(topk_ids, sim, select_top_k, threshold)
    return torch.ops.sere.reroute(topk_ids, sim, select_top_k, threshold)


def _reroute_in_weight_order_eager(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor,
                                   select_top_k: int, threshold: float) -> torch.Tensor:
    _check_torch_inputs(topk_ids, sim)
    if topk_weights.shape != topk_ids.shape or topk_weights.device != topk_ids.device:
        raise ValueError(f"topk_weights must match topk_ids' shape {tuple(topk_ids.shape)} and device "
                         f"{topk_ids.device}, got {tuple(topk_weights.shape)} on {topk_weights.device}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be floating, got {topk_weights.dtype}")
    ids = topk_ids.contiguous()  # T, k
    if sim.dtype not in TORCH_SIM_KIND:
        sim = sim.float()
    sim = sim.contiguous()  # E, E
    out = torch.empty_like(ids)  # T, k
    launch_reroute(ids, sim, out, select_top_k, threshold, weights=topk_weights.contiguous())
    return out


@torch.library.custom_op("sere::reroute_in_weight_order", mutates_args=())
def reroute_in_weight_order_op(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor,
                               select_top_k: int, threshold: float) -> torch.Tensor:
    """torch.ops.sere.reroute_in_weight_order: the weight-order kernel as an opaque op."""
    return _reroute_in_weight_order_eager(topk_ids, topk_weights, sim, select_top_k, threshold)


@reroute_in_weight_order_op.register_fake
def _reroute_in_weight_order_fake(topk_ids, topk_weights, sim, select_top_k, threshold):
    return torch.empty_like(topk_ids, memory_format=torch.contiguous_format)


def reroute_numba_in_weight_order(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor,
                                  select_top_k: int, threshold: float) -> torch.Tensor:
    """Re-routed ids for a router whose slots are NOT sorted by weight (vLLM's grouped top-k,
    torch.topk(sorted=False)): the contract in each token's weight order (descending, ties to the
    lower slot), every id back in its own slot, in one launch at decode sizes; equal bit for bit
    to sort -> reroute_numba -> scatter back, without the argsort, gather and scatter."""
    if (type(topk_ids) is torch.Tensor and type(topk_weights) is torch.Tensor and type(sim) is torch.Tensor
            and not torch.compiler.is_compiling()):
        return _reroute_in_weight_order_eager(topk_ids, topk_weights, sim, select_top_k, threshold)
    return torch.ops.sere.reroute_in_weight_order(topk_ids, topk_weights, sim, select_top_k, threshold)


def _check_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    if topk_weights.shape != topk_ids.shape or topk_weights.device != topk_ids.device:
        raise ValueError(f"topk_weights must match topk_ids' shape {tuple(topk_ids.shape)} and device "
                         f"{topk_ids.device}, got {tuple(topk_weights.shape)} on {topk_weights.device}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be floating, got {topk_weights.dtype}")


def _reroute_merged_eager(topk_ids, topk_weights, sim, select_top_k, threshold, in_weight_order):
    _check_torch_inputs(topk_ids, sim)
    _check_weights(topk_ids, topk_weights)
    ids = topk_ids.contiguous()  # T, k
    weights = topk_weights.float().contiguous()  # T, k (float32 sums; a copy only for other dtypes)
    if sim.dtype not in TORCH_SIM_KIND:
        sim = sim.float()
    sim = sim.contiguous()  # E, E
    out = torch.empty_like(ids)  # T, k
    weights_out = torch.empty_like(weights)  # T, k float32
    launch_reroute_merged(ids, weights, sim, out, weights_out, select_top_k, threshold, in_weight_order=in_weight_order)
    return out, weights_out.to(topk_weights.dtype)


@torch.library.custom_op("sere::reroute_merged", mutates_args=())
def reroute_merged_op(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor, select_top_k: int,
                      threshold: float, in_weight_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.sere.reroute_merged: the merging kernel as an opaque op."""
    return _reroute_merged_eager(topk_ids, topk_weights, sim, select_top_k, threshold, in_weight_order)


@reroute_merged_op.register_fake
def _reroute_merged_fake(topk_ids, topk_weights, sim, select_top_k, threshold, in_weight_order):
    return (torch.empty_like(topk_ids, memory_format=torch.contiguous_format),
            torch.empty_like(topk_weights, memory_format=torch.contiguous_format))


def reroute_numba_merged(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor, select_top_k: int,
                         threshold: float, in_weight_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights): the contract (in each token's weight order when in_weight_order), then each
    token's slots that hold one expert merged into the first of them (summed weight in float32,
    the others id -1 and weight 0; sere.routing.merge_duplicate_slots), in ONE launch of one block.
    For small batches: vLLM's small-batch MoE path (T k 4 <= E) answers id -1 with zeros, so the
    expert's weights are streamed once instead of once per slot. Weights come back in their dtype."""
    if (type(topk_ids) is torch.Tensor and type(topk_weights) is torch.Tensor and type(sim) is torch.Tensor
            and not torch.compiler.is_compiling()):
        return _reroute_merged_eager(topk_ids, topk_weights, sim, select_top_k, threshold, in_weight_order)
    return torch.ops.sere.reroute_merged(topk_ids, topk_weights, sim, select_top_k, threshold, in_weight_order)
