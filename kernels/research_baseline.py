"""A baseline with the structure of the SERE research kernel, for the kernel benchmark.

Run its checks: `pytest tests/test_numba_simulator.py -k baseline` (CUDA simulator) and
`pytest -m gpu tests/test_gpu_kernels.py` (a CUDA GPU). The oracle is
`sere.kernels.reference.reroute_reference`; the one-launch kernel it is measured against is
`sere.kernels.numba_cuda.reroute_numba`.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.

Structure (what the one-launch kernel removes):
  1. torch ops build the primary mask: `zeros` clears it, `clamp` maps invalid head ids to a
     spare slot (the research kernel sent them to expert 0 instead; the contract passes them
     through), `index_fill_` sets it (for int32 ids one more launch casts the index to int64);
  2. a Numba kernel with one thread per slot: a secondary slot scans all E experts of its
     similarity row serially, keeping the best primary one.
So 4 launches for int64 ids, 5 for int32, against one.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from sere.kernels import numba_device
from sere.kernels.numba_launch import TORCH_SIM_KIND
from sere.kernels.numba_pointer import PointerKernel, cached_pointer_kernel
# The kernel body refers to `cuda` by this global name (the simulator swaps it per thread).
from sere.kernels.numba_runtime import cuda, numba

THREADS = 128
_NO_EXPERT = 0x7FFFFFFF


def _make_scan_kernel(sim_kind: str):
    """One thread per slot of ids [T*k]; is_primary [E + 2] int8 (2 spare slots for invalid ids)."""
    load_f32 = numba_device.SIM_LOADERS[sim_kind]
    neg_inf = np.float32(-np.inf)
    no_expert = _NO_EXPERT

    def scan_kernel(ids, is_primary, sim, out, T, k, E, S, rho):
        i = cuda.grid(1)
        if i >= T * k:
            return
        e = ids[i]
        if S <= 0 or S >= k or i % k < S or e < 0 or e >= E or is_primary[e] != 0:
            out[i] = e
            return
        best_v = neg_inf
        best_p = no_expert
        for p in range(E):  # serial scan of the whole row: E dependent-free loads per thread
            if is_primary[p] != 0:
                v = load_f32(sim[e * E + p])
                if best_p == no_expert or v > best_v:
                    best_v = v
                    best_p = p
        if best_p != no_expert and best_v >= rho:
            out[i] = best_p
        else:
            out[i] = e

    return scan_kernel


def _signature(id_name: str, sim_kind: str):
    types = numba.types
    idt = types.int32 if id_name == "int32" else types.int64
    simt = {"float32": types.float32, "float16": types.float16, "bfloat16": types.int16}[sim_kind]
    return types.void(
        types.CPointer(idt), types.CPointer(types.int8), types.CPointer(simt), types.CPointer(idt),
        types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def primary_mask_torch(topk_ids: torch.Tensor, num_experts: int, select_top_k: int) -> torch.Tensor:
    """[E + 2] int8 mask from torch ops: cleared by zeros, filled by index_fill_ (invalid head
    ids land in the two spare slots: -1 wraps to E + 1, ids >= E clamp to E)."""
    E, S = num_experts, select_top_k
    mask = torch.zeros(E + 2, dtype=torch.int8, device=topk_ids.device)  # launch 1
    if 0 < S < topk_ids.shape[1]:
        head = topk_ids[:, :S]  # T, S
        if head.dtype != torch.int64:
            head = head.long()  # index_fill_ takes int64 only: one more launch for int32
        idx = head.clamp(-1, E).reshape(-1)  # launch 2: T*S
        mask.index_fill_(0, idx, 1)  # launch 3
    return mask


def reroute_research_baseline(
    topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float
) -> torch.Tensor:
    """Re-routed ids (new tensor) by the research kernel's structure; CUDA tensors, no sync."""
    if not topk_ids.is_cuda or topk_ids.device != sim.device:
        raise ValueError(f"needs CUDA tensors on one device, got {topk_ids.device} and {sim.device}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {topk_ids.dtype}")
    if sim.dtype not in TORCH_SIM_KIND:
        raise TypeError(f"sim must be float32, float16 or bfloat16, got {sim.dtype}")
    ids = topk_ids.contiguous()  # T, k
    sim = sim.contiguous()  # E, E
    T, k = ids.shape
    E = sim.shape[0]
    S = max(-1, min(int(select_top_k), k))
    out = torch.empty_like(ids)  # T, k
    if T * k == 0:
        return out
    mask = primary_mask_torch(ids, E, S)  # E + 2
    sim_kind = TORCH_SIM_KIND[sim.dtype]
    if sim_kind == "bfloat16":
        sim = sim.view(torch.int16)
    id_name = "int32" if ids.dtype == torch.int32 else "int64"
    kern = cached_pointer_kernel(
        ("research_baseline", id_name, sim_kind),
        lambda: PointerKernel(_make_scan_kernel(sim_kind), _signature(id_name, sim_kind), THREADS),
    )
    device_index = ids.device.index if ids.device.index is not None else torch.cuda.current_device()
    args = (
        ids.data_ptr(), mask.data_ptr(), sim.data_ptr(), out.data_ptr(),
        np.int32(T), np.int32(k), np.int32(E), np.int32(S), np.float32(threshold),
    )
    kern.launch(-(-T * k // THREADS), torch.cuda.current_stream(device_index).cuda_stream, device_index, args)
    return out


@lru_cache(maxsize=None)
def _array_scan_kernel(sim_kind: str):
    return cuda.jit(_make_scan_kernel(sim_kind))


def reroute_research_baseline_numpy(ids: np.ndarray, sim: np.ndarray, select_top_k: int, threshold: float) -> np.ndarray:
    """The baseline's scan kernel on NumPy arrays (CUDA simulator or GPU); the mask is built
    with NumPy here, as torch CUDA ops are not available under the simulator."""
    ids = np.asarray(ids)
    sim = np.asarray(sim)
    if sim.dtype == np.float64:
        sim = sim.astype(np.float32)
    if ids.ndim != 2 or ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"ids must be a 2-D int32/int64 array, got {ids.dtype} shape {ids.shape}")
    if sim.dtype not in (np.float32, np.float16) or sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise TypeError(f"sim must be a square float32/float16 array, got {sim.dtype} shape {sim.shape}")
    T, k = ids.shape
    E = sim.shape[0]
    S = max(-1, min(int(select_top_k), k))
    mask = np.zeros(E + 2, dtype=np.int8)  # E + 2
    if 0 < S < k:
        mask[np.clip(ids[:, :S], -1, E).reshape(-1)] = 1
    out = np.empty_like(ids)
    if T * k == 0:
        return out
    kernel = _array_scan_kernel("float32" if sim.dtype == np.float32 else "float16")
    blocks = -(-T * k // THREADS)
    kernel[blocks, THREADS](np.ascontiguousarray(ids).reshape(-1), mask, np.ascontiguousarray(sim).reshape(-1),
                            out.reshape(-1), np.int32(T), np.int32(k), np.int32(E), np.int32(S),
                            np.float32(threshold))
    return out
