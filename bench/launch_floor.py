"""The floor under any one-launch re-route kernel: what one kernel node costs in CUDA-graph replay
when it does nothing ("empty"), when it only copies the ids to the output ("copy": the reads and
writes every re-route must do), and when each slot also reads an entry of its expert's similarity
row before writing ("gather": the two dependent loads, ids then similarity, that no re-route can
avoid). All launch through the same cuda.core path and grid as the plain kernel, so "kernel minus
floor" is the time the re-routing itself takes, and a target below the floor (issue 14: 2x the
upstream kernel at T <= 256) is shown to be out of reach for one launch.

Device-only (numba-cuda on a GPU); the bench records them beside the plain kernel's time.
Index letters: T = tokens, k = experts per token.
"""
from __future__ import annotations

import numpy as np
import torch

from sere.kernels.numba_kernels import DEFAULT_THREADS
from sere.kernels.numba_launch import grid_blocks, max_blocks_for, pointer_inputs
from sere.kernels.numba_pointer import PointerKernel, cached_pointer_kernel
from sere.kernels.numba_runtime import cuda, numba


FLOORS = ("empty", "copy", "gather")


def _empty(ids, sim, out, n, E):  # noqa: ARG001 - every floor kernel takes the same arguments
    pass


def _copy(ids, sim, out, n, E):  # noqa: ARG001
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        out[i] = ids[i]
        i += stride


def _gather(ids, sim, out, n, E):
    """out[i] = ids[i] where its similarity row's diagonal entry is >= 0 (always, for a similarity),
    else -1: the write waits on both loads, as a re-route's does."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        e = ids[i]
        out[i] = e if sim[e * E + e] >= 0 else -1
        i += stride


def _floor_kernel(name: str, id_name: str) -> PointerKernel:
    types = numba.types
    idt = types.int32 if id_name == "int32" else types.int64
    signature = types.void(types.CPointer(idt), types.CPointer(types.float32), types.CPointer(idt),
                           types.int32, types.int32)
    body = {"empty": _empty, "copy": _copy, "gather": _gather}[name]
    return cached_pointer_kernel(("floor", name, id_name), lambda: PointerKernel(body, signature, DEFAULT_THREADS))


def floor_launcher(name: str, topk_ids: torch.Tensor, sim: torch.Tensor, out: torch.Tensor, select_top_k: int):
    """A no-argument callable that launches the `name` floor kernel (FLOORS) on torch's current
    stream with the grid the plain kernel takes for these ids (graph-capturable). topk_ids [T, k]
    valid expert ids, sim [E, E] float32 with a non-negative diagonal, out like topk_ids."""
    if name not in FLOORS:
        raise ValueError(f"floor kernel must be one of {FLOORS}, not {name!r}")
    if topk_ids.dim() != 2 or not topk_ids.is_cuda or out.shape != topk_ids.shape or out.dtype != topk_ids.dtype:
        raise ValueError(f"floor kernels take CUDA ids [T, k] and an out of the same shape and dtype, "
                         f"got {tuple(topk_ids.shape)} {topk_ids.dtype} and {tuple(out.shape)} {out.dtype}")
    if sim.dtype != torch.float32 or sim.dim() != 2 or sim.shape[0] != sim.shape[1] or not sim.is_contiguous():
        raise ValueError(f"floor kernels take a contiguous float32 sim [E, E], got {sim.dtype} {tuple(sim.shape)}")
    T, k = topk_ids.shape
    _, _, id_name, device_index = pointer_inputs(topk_ids, sim)
    kern = _floor_kernel(name, id_name)
    blocks = grid_blocks(T, k, select_top_k, DEFAULT_THREADS, max_blocks_for(device_index))
    args = (topk_ids.data_ptr(), sim.data_ptr(), out.data_ptr(), np.int32(T * k), np.int32(sim.shape[0]))

    def launch() -> None:
        kern.launch(blocks, torch.cuda.current_stream(device_index).cuda_stream, device_index, args)

    return launch
