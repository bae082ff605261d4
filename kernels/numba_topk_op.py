"""The fused router top-k + re-route kernel (sere.kernels.numba_topk) on torch tensors: its launch
and the torch custom op `torch.ops.sere.topk_reroute`, with `topk_reroute_numba`, the entry that
skips the dispatcher on plain eager tensors.

    weights, ids = topk_reroute_numba(router_logits, sim, top_k=8, renormalize=True,
                                      select_top_k=1, threshold=0.0)     # [T, k] float32, [T, k] int32
"""
from __future__ import annotations

import numpy as np
import torch

from sere.kernels.numba_kernels import DEFAULT_THREADS, WARP
from sere.kernels.numba_launch import TORCH_SIM_KIND, columns_per_lane, max_blocks_for
from sere.kernels.numba_pointer import PointerKernel, numba_type, cached_pointer_kernel
from sere.kernels.numba_runtime import numba
from sere.kernels.numba_topk import MAX_K, make_topk_reroute_kernel, topk_launch_shape

_ID_TYPES = {torch.int32: "int32", torch.int64: "int64"}
MERGE_MAX_TOKENS = DEFAULT_THREADS // WARP  # the merging variant: one block, a group of WARP lanes per token


def _signature(logit_kind: str, sim_kind: str, id_name: str):
    """void(logits*, sim*, weights_out*, ids_out*, T, E, k, S, rho, renormalize)."""
    types = numba.types
    return types.void(
        types.CPointer(numba_type(logit_kind)), types.CPointer(numba_type(sim_kind)),
        types.CPointer(types.float32), types.CPointer(numba_type(id_name)),
        types.int32, types.int32, types.int32, types.int32, types.float32, types.int32,
    )


def _kernel(logit_kind: str, sim_kind: str, id_name: str, cols: int, threads: int, top_k: int,
            merge: bool, chunk: int) -> PointerKernel:
    return cached_pointer_kernel(
        ("topk_reroute", logit_kind, sim_kind, id_name, cols, threads, top_k, merge, chunk),  # compiled for one k
        lambda: PointerKernel(make_topk_reroute_kernel(logit_kind, sim_kind, cols, threads, WARP, top_k, merge, chunk),
                              _signature(logit_kind, sim_kind, id_name), threads),
    )


def _check(router_logits: torch.Tensor, sim: torch.Tensor, top_k: int, ids_dtype: torch.dtype) -> None:
    if not router_logits.is_cuda or router_logits.device != sim.device:
        raise ValueError(f"topk_reroute_numba needs CUDA tensors on one device, got {router_logits.device} and {sim.device}")
    if router_logits.dim() != 2 or router_logits.dtype not in TORCH_SIM_KIND:
        raise TypeError(f"router_logits must be 2-D float32/float16/bfloat16 [T, E], got {router_logits.dtype} "
                        f"shape {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if tuple(sim.shape) != (E, E) or sim.dtype not in TORCH_SIM_KIND:
        raise ValueError(f"sim must be float32/float16/bfloat16 [{E}, {E}], got {sim.dtype} {tuple(sim.shape)}")
    if not 1 <= top_k <= min(E, MAX_K):
        raise ValueError(f"top_k must be in 1..{min(E, MAX_K)}, got {top_k}")
    if ids_dtype not in _ID_TYPES:
        raise TypeError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype}")
    if router_logits.numel() >= 2**31 or sim.numel() >= 2**31:
        raise ValueError("topk_reroute_numba indexes with 32-bit counts: T*E and E*E must be < 2**31")


def _eager(router_logits, sim, top_k, renormalize, select_top_k, threshold, ids_dtype=torch.int32, merge=False,
           chunk_tokens=None):
    _check(router_logits, sim, top_k, ids_dtype)
    T, E = router_logits.shape
    if merge and T > MERGE_MAX_TOKENS:
        raise ValueError(f"topk_reroute_numba merges in one block of {MERGE_MAX_TOKENS} tokens at most, got T={T} "
                         "(merging pays on vLLM's small-batch path, T k 4 <= E)")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=ids_dtype, device=router_logits.device)
    if T == 0:
        return weights, ids
    logits = router_logits.contiguous()
    sim = sim.contiguous()
    logit_kind, sim_kind = TORCH_SIM_KIND[logits.dtype], TORCH_SIM_KIND[sim.dtype]
    if logit_kind == "bfloat16":
        logits = logits.view(torch.int16)
    if sim_kind == "bfloat16":
        sim = sim.view(torch.int16)
    device_index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    threads = DEFAULT_THREADS
    chunk, blocks = topk_launch_shape(T, top_k, threads, WARP, max_blocks_for(device_index), merge, chunk_tokens)
    S = max(-1, min(int(select_top_k), top_k))
    kern = _kernel(logit_kind, sim_kind, _ID_TYPES[ids_dtype], columns_per_lane(E), threads, top_k, bool(merge), chunk)
    args = (logits.data_ptr(), sim.data_ptr(), weights.data_ptr(), ids.data_ptr(), np.int32(T), np.int32(E),
            np.int32(top_k), np.int32(S), np.float32(threshold), np.int32(bool(renormalize)))
    kern.launch(blocks, torch.cuda.current_stream(device_index).cuda_stream, device_index, args)
    return weights, ids


@torch.library.custom_op("sere::topk_reroute", mutates_args=())
def topk_reroute_op(router_logits: torch.Tensor, sim: torch.Tensor, top_k: int, renormalize: bool,
                    select_top_k: int, threshold: float, ids_int64: bool = False,
                    merge: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.sere.topk_reroute: the fused kernel as an opaque op for torch.compile / export."""
    return _eager(router_logits, sim, top_k, renormalize, select_top_k, threshold,
                  torch.int64 if ids_int64 else torch.int32, merge)


@topk_reroute_op.register_fake
def _fake(router_logits, sim, top_k, renormalize, select_top_k, threshold, ids_int64=False, merge=False):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=torch.float32),
            router_logits.new_empty((T, top_k), dtype=torch.int64 if ids_int64 else torch.int32))


def topk_reroute_numba(router_logits: torch.Tensor, sim: torch.Tensor, top_k: int, renormalize: bool,
                       select_top_k: int, threshold: float, ids_dtype: torch.dtype = torch.int32,
                       merge: bool = False, chunk_tokens: int | None = None):
    """(topk_weights [T, k] float32, topk_ids [T, k]) of a softmax router with SERE applied, in one
    launch (sere.kernels.numba_topk); torch's current stream, no sync, graph-capturable. merge=True
    (T <= 8): each token's duplicate slots merged too (id -1, weight 0 for a repeat; the first slot
    of an expert holds the summed weight), as the merging re-route kernel does. chunk_tokens: tokens
    per block and round (default `topk_chunk_tokens`), a benchmark knob of eager calls only."""
    if chunk_tokens is not None and (merge or torch.compiler.is_compiling()):
        raise ValueError("chunk_tokens is a benchmark knob of eager calls without merge")
    if type(router_logits) is torch.Tensor and type(sim) is torch.Tensor and not torch.compiler.is_compiling():
        return _eager(router_logits, sim, top_k, renormalize, select_top_k, threshold, ids_dtype, merge,
                      chunk_tokens)
    return torch.ops.sere.topk_reroute(router_logits, sim, top_k, renormalize, select_top_k, threshold,
                                       ids_dtype == torch.int64, merge)
