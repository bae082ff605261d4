"""NumPy entry: the same reroute kernels on host arrays (the CUDA simulator or a GPU), for
the simulator tests and the routing goldens.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from sere.kernels.numba_kernels import (COLUMNS_PER_LANE_BUCKETS, DEFAULT_THREADS, WARP, make_flags_kernel, make_kernel,
                                        make_scatter_flags_kernel)
from sere.kernels.numba_launch import (after_flags_blocks, check_flags_build, columns_per_lane, grid_blocks,
                                       scatter_flags_blocks, use_two_launch)
from sere.kernels.numba_runtime import NUMBA_ERROR, cuda, simulator_enabled

_NUMPY_SIM_KIND = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


@lru_cache(maxsize=None)
def _array_kernel(sim_kind: str, cols: int, threads: int, lanes: int, two_launch: bool = False,
                  weight_kind: str | None = None):
    return cuda.jit(make_kernel(sim_kind, cols, threads, lanes, two_launch, weight_kind))


@lru_cache(maxsize=None)
def _array_merge_kernel(sim_kind: str, cols: int, threads: int, lanes: int, top_k: int, in_weight_order: bool):
    return cuda.jit(make_kernel(sim_kind, cols, threads, lanes, weight_kind="float32" if in_weight_order else None,
                                merge=True, top_k=top_k))


@lru_cache(maxsize=None)
def _array_flags_kernel(threads: int):
    return cuda.jit(make_flags_kernel(threads))


@lru_cache(maxsize=None)
def _array_scatter_flags_kernel():
    return cuda.jit(make_scatter_flags_kernel())


SIMULATOR_LANES = 4  # lanes per slot under the simulator: fewer barrier rounds, same code path


def reroute_numba_numpy(
    ids: np.ndarray,
    sim: np.ndarray,
    select_top_k: int,
    threshold: float,
    *,
    bf16_bits: bool = False,
    threads: int | None = None,
    max_blocks: int | None = None,
    lanes: int | None = None,
    two_launch: bool | None = None,
    weights: np.ndarray | None = None,
    flags_build: str | None = None,
) -> np.ndarray:
    """The kernel on NumPy arrays; returns new ids (same shape and dtype).

    ids [T, k] int32/int64; sim [E, E] float32/float16 (float64 is cast to float32, as the
    contract compares in float32), or int16/uint16 bfloat16 bit patterns with bf16_bits=True.
    Works under the CUDA simulator (defaults there: 32 threads, groups of 4 lanes, at most 2
    blocks, so the grid-stride loop runs several rounds; each block barrier costs the simulator
    dearly) and on a real GPU (32 lanes, 256 threads; numba copies the arrays both ways).
    two_launch forces the large-T path on or off (None: `use_two_launch`, as on torch tensors);
    flags_build how its launch 1 builds P ("block" or "scatter"; None: numba_launch.FLAGS_BUILD).
    weights [T, k] float32/float16: the router's weights for slots that are not sorted by
    weight; the weight-order kernel (one launch, see numba_kernels.make_kernel) then applies
    the contract in each token's weight order and writes every id back to its own slot.
    """
    if cuda is None:
        raise RuntimeError(f"numba-cuda is not importable: {NUMBA_ERROR}")
    ids = np.asarray(ids)
    sim = np.asarray(sim)
    if ids.ndim != 2 or ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"ids must be a 2-D int32/int64 array, got {ids.dtype} shape {ids.shape}")
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be square [E, E], got shape {sim.shape}")
    if bf16_bits:
        if sim.dtype not in (np.int16, np.uint16):
            raise TypeError(f"bf16_bits=True needs int16/uint16 bit patterns, got {sim.dtype}")
        sim_kind, sim_flat = "bfloat16", np.ascontiguousarray(sim).view(np.int16).reshape(-1)
    else:
        if sim.dtype == np.float64:
            sim = sim.astype(np.float32)
        if sim.dtype not in _NUMPY_SIM_KIND:
            raise TypeError(f"sim must be float32/float16 (or bf16 bits), got {sim.dtype}")
        sim_kind, sim_flat = _NUMPY_SIM_KIND[sim.dtype], np.ascontiguousarray(sim).reshape(-1)
    T, k = ids.shape
    E = sim.shape[0]
    weight_kind = None
    if weights is not None:
        weights = np.asarray(weights)
        if weights.shape != ids.shape or weights.dtype not in _NUMPY_SIM_KIND:
            raise TypeError(f"weights must be float32/float16 of the ids' shape {ids.shape}, "
                            f"got {weights.dtype} shape {weights.shape}")
        if k > 64:
            raise ValueError(f"the weight-order kernel takes k <= 64 slots per token, got k={k}")
        weight_kind = _NUMPY_SIM_KIND[weights.dtype]
    out = np.empty_like(ids)
    if T * k == 0:
        return out
    sim_mode = simulator_enabled()
    threads = threads or (WARP if sim_mode else DEFAULT_THREADS)
    max_blocks = max_blocks or (2 if sim_mode else 1024)
    if lanes is None:
        lanes = SIMULATOR_LANES if sim_mode and E <= SIMULATOR_LANES * COLUMNS_PER_LANE_BUCKETS[-1] else WARP
    S = max(-1, min(int(select_top_k), k))
    blocks = grid_blocks(T, k, S, threads, max_blocks, lanes)
    ids_flat = np.ascontiguousarray(ids).reshape(-1)
    out_flat = out.reshape(-1)
    shape = (np.int32(T), np.int32(k), np.int32(E), np.int32(S))
    cols = columns_per_lane(E, lanes)
    if two_launch is None:
        two_launch = use_two_launch(T, k, S)
    if weight_kind is not None:
        kernel = _array_kernel(sim_kind, cols, threads, lanes, False, weight_kind)
        kernel[blocks, threads](ids_flat, np.ascontiguousarray(weights).reshape(-1), sim_flat, out_flat, *shape,
                                np.float32(threshold))
        return out
    if two_launch and 0 < S < k:
        if check_flags_build(flags_build) == "scatter":
            flags = cuda.to_device(np.zeros(E, dtype=np.int32))  # the fill of the GPU path
            _array_scatter_flags_kernel()[scatter_flags_blocks(T, S, threads), threads](ids_flat, flags, *shape)
        else:
            flags = cuda.to_device(np.full(E, -1, dtype=np.int32))  # E: -1 so an unwritten flag shows
            _array_flags_kernel(threads)[1, threads](ids_flat, flags, *shape)
        _array_kernel(sim_kind, cols, threads, lanes, True)[after_flags_blocks(T, k, S, threads, max_blocks), threads](
            ids_flat, sim_flat, flags, out_flat, *shape, np.float32(threshold))
        return out
    kernel = _array_kernel(sim_kind, cols, threads, lanes)
    kernel[blocks, threads](ids_flat, sim_flat, out_flat, *shape, np.float32(threshold))
    return out


def reroute_merged_numba_numpy(ids: np.ndarray, weights: np.ndarray, sim: np.ndarray, select_top_k: int,
                               threshold: float, *, in_weight_order: bool = False, threads: int | None = None,
                               lanes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The merging kernel (re-route, then one slot per expert per token; one block) on NumPy arrays:
    (ids of the input's dtype, weights float32). ids [T, k] int32/int64, weights [T, k] float32,
    sim [E, E] float32/float16. in_weight_order: the slots are not sorted by weight. Simulator
    defaults as reroute_numba_numpy's (32 threads, groups of 4 lanes)."""
    if cuda is None:
        raise RuntimeError(f"numba-cuda is not importable: {NUMBA_ERROR}")
    ids, weights, sim = np.asarray(ids), np.asarray(weights), np.asarray(sim)
    if ids.ndim != 2 or ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"ids must be a 2-D int32/int64 array, got {ids.dtype} shape {ids.shape}")
    if weights.shape != ids.shape or weights.dtype != np.float32:
        raise TypeError(f"weights must be float32 of the ids' shape {ids.shape}, got {weights.dtype} shape {weights.shape}")
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.dtype not in _NUMPY_SIM_KIND:
        raise TypeError(f"sim must be float32/float16 [E, E], got {sim.dtype} shape {sim.shape}")
    T, k = ids.shape
    E = sim.shape[0]
    out, weights_out = np.empty_like(ids), np.empty_like(weights)
    if T * k == 0:
        return out, weights_out
    sim_mode = simulator_enabled()
    threads = threads or (WARP if sim_mode else DEFAULT_THREADS)
    if lanes is None:
        lanes = SIMULATOR_LANES if sim_mode and E <= SIMULATOR_LANES * COLUMNS_PER_LANE_BUCKETS[-1] else WARP
    kernel = _array_merge_kernel(_NUMPY_SIM_KIND[sim.dtype], columns_per_lane(E, lanes), threads, lanes, k,
                                 in_weight_order)
    S = max(-1, min(int(select_top_k), k))
    kernel[1, threads](np.ascontiguousarray(ids).reshape(-1), np.ascontiguousarray(weights).reshape(-1),
                       np.ascontiguousarray(sim).reshape(-1), out.reshape(-1), weights_out.reshape(-1),
                       np.int32(T), np.int32(k), np.int32(E), np.int32(S), np.float32(threshold))
    return out, weights_out


@lru_cache(maxsize=None)
def _array_topk_kernel(logit_kind: str, sim_kind: str, cols: int, threads: int, lanes: int, top_k: int,
                       merge: bool = False, chunk: int | None = None):
    from sere.kernels.numba_topk import make_topk_reroute_kernel

    return cuda.jit(make_topk_reroute_kernel(logit_kind, sim_kind, cols, threads, lanes, top_k, merge, chunk))


def topk_reroute_numba_numpy(router_logits: np.ndarray, top_k: int, renormalize: bool, sim: np.ndarray,
                             select_top_k: int, threshold: float, *, threads: int | None = None,
                             max_blocks: int | None = None, lanes: int | None = None,
                             merge: bool = False, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fused top-k + re-route kernel (sere.kernels.numba_topk) on NumPy arrays: (weights [T, k]
    float32, ids [T, k] int64). router_logits [T, E] and sim [E, E] float32/float16. Simulator
    defaults as reroute_numba_numpy's. merge=True: duplicate slots merged too, in one block
    (T <= threads / lanes). chunk: tokens per block and round (default the launch rule,
    topk_chunk_tokens)."""
    from sere.kernels.numba_topk import MAX_K, topk_launch_shape

    if cuda is None:
        raise RuntimeError(f"numba-cuda is not importable: {NUMBA_ERROR}")
    logits, sim = np.asarray(router_logits), np.asarray(sim)
    if logits.ndim != 2 or logits.dtype not in _NUMPY_SIM_KIND:
        raise TypeError(f"router_logits must be 2-D float32/float16, got {logits.dtype} shape {logits.shape}")
    T, E = logits.shape
    if sim.shape != (E, E) or sim.dtype not in _NUMPY_SIM_KIND:
        raise TypeError(f"sim must be float32/float16 [{E}, {E}], got {sim.dtype} shape {sim.shape}")
    if not 1 <= top_k <= min(E, MAX_K):
        raise ValueError(f"top_k must be in 1..{min(E, MAX_K)}, got {top_k}")
    weights = np.empty((T, top_k), dtype=np.float32)
    ids = np.empty((T, top_k), dtype=np.int64)
    if T == 0:
        return weights, ids
    sim_mode = simulator_enabled()
    threads = threads or (WARP if sim_mode else DEFAULT_THREADS)
    max_blocks = max_blocks or (2 if sim_mode else 1024)
    if lanes is None:
        lanes = SIMULATOR_LANES if sim_mode and E <= SIMULATOR_LANES * COLUMNS_PER_LANE_BUCKETS[-1] else WARP
    cols = columns_per_lane(E, lanes)
    S = max(-1, min(int(select_top_k), top_k))
    chunk, blocks = topk_launch_shape(T, top_k, threads, lanes, max_blocks, merge, chunk)
    if merge and T > chunk:
        raise ValueError(f"the merging fused kernel takes T <= {chunk} tokens (one block), got T={T}")
    kernel = _array_topk_kernel(_NUMPY_SIM_KIND[logits.dtype], _NUMPY_SIM_KIND[sim.dtype], cols, threads, lanes, top_k,
                                merge, chunk)
    w_flat, i_flat = weights.reshape(-1), ids.reshape(-1)
    kernel[blocks, threads](np.ascontiguousarray(logits).reshape(-1), np.ascontiguousarray(sim).reshape(-1), w_flat,
                            i_flat, np.int32(T), np.int32(E), np.int32(top_k), np.int32(S), np.float32(threshold),
                            np.int32(bool(renormalize)))
    return weights, ids
