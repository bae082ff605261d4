"""A baseline with the structure of the published SERE research kernel, for the kernel benchmark.

Run its checks: `pytest tests/test_numba_simulator.py -k baseline` (CUDA simulator) and
`pytest -m gpu tests/test_gpu_kernels.py` (a CUDA GPU). The oracle is
`sere.kernels.reference.reroute_reference`; the one-launch kernel it is measured against is
`sere.kernels.numba_cuda.reroute_numba`.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.

Structure (as the upstream CUDA source ships it: three kernels, what the one-launch kernel fuses):
  1. clear: one thread per expert zeroes the primary mask [E + 2];
  2. scatter: one thread per head slot (T*S) sets mask[id] (invalid head ids land in two spare
     slots: -1 wraps to E + 1, ids >= E clamp to E; the research kernel sent them to expert 0,
     the contract passes them through);
  3. scan: one thread per slot; a secondary slot scans all E experts of its similarity row
     serially, keeping the best primary one.
Three launches through the same raw-pointer launcher as the one-launch kernel, so the
comparison is kernel structure, not Python overhead. (An earlier version built the mask with
torch ops, 4-5 launches, about three times the upstream kernel's time on an H200.)
Measured for the real kernel (compiled from its published source) on an H200, E = 128, k = 8,
graph replay: 3.6 / 3.6 / 3.8 / 4.0 us at T = 1 / 16 / 64 / 256 (S = 1), 6.5 us at T = 4096.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from sere.kernels import numba_device
from sere.kernels.numba_launch import TORCH_SIM_KIND, pointer_inputs
from sere.kernels.numba_pointer import PointerKernel, cached_pointer_kernel, numba_type
# The kernel body refers to `cuda` by this global name (the simulator swaps it per thread).
from sere.kernels.numba_runtime import cuda, numba

THREADS = 128
_NO_EXPERT = 0x7FFFFFFF


def _make_clear_kernel():
    def clear_kernel(is_primary, n):
        i = cuda.grid(1)
        if i < n:
            is_primary[i] = 0

    return clear_kernel


def _make_scatter_kernel():
    def scatter_kernel(ids, is_primary, T, k, E, S):
        i = cuda.grid(1)
        if i >= T * S:
            return
        t = i // S
        h = ids[t * k + (i - t * S)]
        if h < 0:
            h = E + 1  # spare slot: -1 padding and expert-parallel masking are never primary
        elif h >= E:
            h = E
        is_primary[h] = 1

    return scatter_kernel


SCAN_UNROLL = 32  # columns loaded before any is used (bench/lab/probe_baseline.py: 1-32 on an H100, 32 fastest)


def _make_scan_kernel(sim_kind: str, unroll: int = SCAN_UNROLL):
    """One thread per slot of ids [T*k]; is_primary [E + 2] int8 (2 spare slots for invalid ids).
    The row is read `unroll` columns at a time with every load issued before any is used, as a
    C compiler unrolls the published kernel's loop: a loop that branches on the mask before each
    load runs the E loads one after another (measured 10-12 us per call at T <= 256 on an H100,
    about three times the published kernel)."""
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
        vals = cuda.local.array(unroll, numba.float32)  # registers once the loops are unrolled
        marks = cuda.local.array(unroll, numba.int8)
        best_v = neg_inf
        best_p = no_expert
        row = e * E
        for p0 in range(0, E, unroll):  # serial scan of the whole row, `unroll` loads in flight
            for u in range(unroll):
                if p0 + u < E:
                    vals[u] = load_f32(sim[row + p0 + u])
                    marks[u] = is_primary[p0 + u]
                else:
                    marks[u] = 0
            for u in range(unroll):  # ascending columns, strict >: the smallest index wins ties
                if marks[u] != 0 and (best_p == no_expert or vals[u] > best_v):
                    best_v = vals[u]
                    best_p = p0 + u
        if best_p != no_expert and best_v >= rho:
            out[i] = best_p
        else:
            out[i] = e

    return scan_kernel


def _signature(id_name: str, sim_kind: str):
    types = numba.types
    idt = numba_type(id_name)
    return types.void(
        types.CPointer(idt), types.CPointer(types.int8), types.CPointer(numba_type(sim_kind)), types.CPointer(idt),
        types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def _clear_signature():
    return numba.types.void(numba.types.CPointer(numba.types.int8), numba.types.int32)


def _scatter_signature(id_name: str):
    types = numba.types
    return types.void(types.CPointer(numba_type(id_name)), types.CPointer(types.int8), types.int32, types.int32,
                      types.int32, types.int32)


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def reroute_research_baseline(
    topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float, *, unroll: int = SCAN_UNROLL
) -> torch.Tensor:
    """Re-routed ids (new tensor) by the research kernel's structure (three launches: clear,
    scatter, scan); CUDA tensors, no sync, graph-capturable once compiled. `unroll`: the scan's
    loads in flight (a probe knob; see SCAN_UNROLL)."""
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
    mask = torch.empty(E + 2, dtype=torch.int8, device=ids.device)  # E + 2: cleared by launch 1
    sim, sim_kind, id_name, device_index = pointer_inputs(ids, sim)
    stream = torch.cuda.current_stream(device_index).cuda_stream
    clear = cached_pointer_kernel(("research_clear",), lambda: PointerKernel(_make_clear_kernel(), _clear_signature(),
                                                                             THREADS))
    clear.launch(_blocks(E + 2), stream, device_index, (mask.data_ptr(), np.int32(E + 2)))
    shape = (np.int32(T), np.int32(k), np.int32(E), np.int32(S))
    if 0 < S < k:
        scatter = cached_pointer_kernel(("research_scatter", id_name), lambda: PointerKernel(
            _make_scatter_kernel(), _scatter_signature(id_name), THREADS))
        scatter.launch(_blocks(T * S), stream, device_index, (ids.data_ptr(), mask.data_ptr()) + shape)
    scan = cached_pointer_kernel(
        ("research_baseline", id_name, sim_kind, unroll),
        lambda: PointerKernel(_make_scan_kernel(sim_kind, unroll), _signature(id_name, sim_kind), THREADS),
    )
    args = (ids.data_ptr(), mask.data_ptr(), sim.data_ptr(), out.data_ptr()) + shape + (np.float32(threshold),)
    scan.launch(_blocks(T * k), stream, device_index, args)
    return out


@lru_cache(maxsize=None)
def _array_kernel(name: str, sim_kind: str = ""):
    make = {"clear": _make_clear_kernel, "scatter": _make_scatter_kernel}.get(name)
    return cuda.jit(make() if make else _make_scan_kernel(sim_kind))


def reroute_research_baseline_numpy(ids: np.ndarray, sim: np.ndarray, select_top_k: int, threshold: float) -> np.ndarray:
    """The baseline's three kernels on NumPy arrays (CUDA simulator or GPU)."""
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
    out = np.empty_like(ids)
    if T * k == 0:
        return out
    ids_flat = cuda.to_device(np.ascontiguousarray(ids).reshape(-1))
    mask = cuda.to_device(np.full(E + 2, 7, dtype=np.int8))  # not zero: launch 1 must clear it
    _array_kernel("clear")[_blocks(E + 2), THREADS](mask, np.int32(E + 2))
    shape = (np.int32(T), np.int32(k), np.int32(E), np.int32(S))
    if 0 < S < k:
        _array_kernel("scatter")[_blocks(T * S), THREADS](ids_flat, mask, *shape)
    out_dev = cuda.to_device(out.reshape(-1))
    kernel = _array_kernel("scan", "float32" if sim.dtype == np.float32 else "float16")
    kernel[_blocks(T * k), THREADS](ids_flat, mask, np.ascontiguousarray(sim).reshape(-1), out_dev, *shape,
                                    np.float32(threshold))
    return out_dev.copy_to_host().reshape(T, k)
