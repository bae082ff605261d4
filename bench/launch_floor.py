"""The floor under any one-launch re-route kernel: what one kernel node costs in CUDA-graph replay
when it does nothing, and when it only copies the ids to the output (the reads and writes every
re-route must do). Both launch through the same cuda.core path and grid as the plain kernel, so
"kernel minus floor" is the time the re-routing itself takes, and a target below the floor (issue
14: 2x the upstream kernel at T <= 256) is shown to be out of reach for one launch.

Device-only (numba-cuda on a GPU); the bench records both beside the plain kernel's time.
Index letters: T = tokens, k = experts per token.
"""
from __future__ import annotations

import numpy as np
import torch

from sere.kernels.numba_kernels import DEFAULT_THREADS
from sere.kernels.numba_launch import grid_blocks, max_blocks_for
from sere.kernels.numba_pointer import PointerKernel, cached_pointer_kernel
from sere.kernels.numba_runtime import cuda, numba


def _empty(ids, out, n):  # noqa: ARG001 - the arguments match the copy kernel's, unused on purpose
    pass


def _copy(ids, out, n):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        out[i] = ids[i]
        i += stride


def _floor_kernel(name: str, id_name: str) -> PointerKernel:
    types = numba.types
    idt = types.int32 if id_name == "int32" else types.int64
    signature = types.void(types.CPointer(idt), types.CPointer(idt), types.int32)
    body = {"empty": _empty, "copy": _copy}[name]
    return cached_pointer_kernel(("floor", name, id_name), lambda: PointerKernel(body, signature, DEFAULT_THREADS))


def floor_launcher(name: str, topk_ids: torch.Tensor, out: torch.Tensor, select_top_k: int):
    """A no-argument callable that launches the `name` ("empty" or "copy") floor kernel on torch's
    current stream with the grid the plain kernel takes for these ids (graph-capturable)."""
    if name not in ("empty", "copy"):
        raise ValueError(f"floor kernel must be 'empty' or 'copy', not {name!r}")
    if topk_ids.dim() != 2 or not topk_ids.is_cuda or out.shape != topk_ids.shape or out.dtype != topk_ids.dtype:
        raise ValueError(f"floor kernels take CUDA ids [T, k] and an out of the same shape and dtype, "
                         f"got {tuple(topk_ids.shape)} {topk_ids.dtype} and {tuple(out.shape)} {out.dtype}")
    T, k = topk_ids.shape
    id_name = "int32" if topk_ids.dtype == torch.int32 else "int64"
    device_index = topk_ids.device.index if topk_ids.device.index is not None else torch.cuda.current_device()
    kern = _floor_kernel(name, id_name)
    blocks = grid_blocks(T, k, select_top_k, DEFAULT_THREADS, max_blocks_for(device_index))
    args = (topk_ids.data_ptr(), out.data_ptr(), np.int32(T * k))

    def launch() -> None:
        kern.launch(blocks, torch.cuda.current_stream(device_index).cuda_stream, device_index, args)

    return launch
