"""The launch rule of the reroute kernels on torch tensors, and the launch itself.

The shape rule (`use_two_launch`: shapes and S only, so graph- and compile-safe) picks one
launch at decode sizes and two at large T; `grid_blocks` and `columns_per_lane` give the grid
and the compile-time bucket; `launch_reroute` writes re-routed ids into a caller's tensor on
torch's current stream.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from sere.kernels.numba_kernels import COLUMNS_PER_LANE_BUCKETS, DEFAULT_THREADS, WARP
from sere.kernels.numba_pointer import (after_flags_pointer_kernel, flags_pointer_kernel, merge_pointer_kernel,
                                        pointer_kernel, scatter_flags_pointer_kernel)

BLOCKS_PER_SM = 4  # grid cap: enough warps in flight, few redundant builds of P
# Large-T path: from this many tokens on, launch 1 builds P once into a flags buffer and launch 2
# reads it (bench/results/kernel.md, "Large T: the two-launch path"; H100: one launch wins at
# T <= 256, two win from T = 1024 for S = 1 and 2). A token count, not T*S, so that decode
# batches (T <= 256) stay on the one-launch kernel whatever S.
TWO_LAUNCH_MIN_TOKENS = 1024
# Launch 2's grid cap (blocks per SM, read at call time). With a group per slot a wider grid was
# slower: H100, T = 4096, S = 1: 13.1 / 14.8 / 17.3 us at 4 / 16 / 64 blocks per SM
# (bench/lab/probe_large_grid.py); launch 2 now takes a thread per slot (after_flags_blocks).
TWO_LAUNCH_BLOCKS_PER_SM = 4
# How launch 1 builds the primary flags (read at call time): "scatter", a zeroing fill then a thread
# per head slot over the grid (the research kernel's structure); "block", one block walks all T*S
# head ids and writes every flag. Scatter is the default since it was timed side by side (H100,
# 2026-12-07, bench/RESULTS.md section 17): T = 4096, S = 1 / 2: 5.5 / 5.4 us against 6.4 / 8.0.
FLAGS_BUILD = "scatter"
FLAGS_BUILDS = ("block", "scatter")
# The merging kernel runs as ONE block (its last step needs every new id of every token): a wider
# block covers more secondary slots per round. Wider rows hold more registers per thread: from 16
# columns per lane (E > 256) 512 threads do not launch (H100, CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES at
# E = 1024), so those take the plain kernel's 256. See merge_geometry for the group width.
MERGE_THREADS = 512
MERGE_THREADS_WIDE_ROWS = DEFAULT_THREADS
MAX_WEIGHTED_K = 64  # the weight-order kernel marks a token's taken slots in one int64
TORCH_SIM_KIND = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def columns_per_lane(num_experts: int, lanes: int = WARP) -> int:
    """The compile-time bucket for E experts split over `lanes` lanes; a clear error when E
    is above what the kernel keeps in registers and shared memory."""
    for bucket in COLUMNS_PER_LANE_BUCKETS:
        if num_experts <= lanes * bucket:
            return bucket
    raise ValueError(
        f"the Numba reroute kernel supports at most {lanes * COLUMNS_PER_LANE_BUCKETS[-1]} experts "
        f"(each of {lanes} lanes keeps {COLUMNS_PER_LANE_BUCKETS[-1]} similarity columns in registers "
        f"and the primary set lives in shared memory); got E={num_experts}. "
        "Use backend='torch' for larger E."
    )


def use_two_launch(T: int, k: int, S: int) -> bool:
    """The shape rule (shapes and S only: graph- and compile-safe): two launches once T reaches
    TWO_LAUNCH_MIN_TOKENS (read at call time, so tests can lower it), where the one-launch
    kernel's per-block rebuild of P from all T*S head ids costs more than a second launch."""
    return 0 < S < k and T >= TWO_LAUNCH_MIN_TOKENS


def check_flags_build(flags_build: str | None) -> str:
    """The two-launch path's way of building P: flags_build, or FLAGS_BUILD when None."""
    build = FLAGS_BUILD if flags_build is None else flags_build
    if build not in FLAGS_BUILDS:
        raise ValueError(f"flags_build must be one of {', '.join(FLAGS_BUILDS)}, got {build!r}")
    return build


@lru_cache(maxsize=None)
def max_blocks_for(device_index: int) -> int:
    return BLOCKS_PER_SM * torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_blocks(T: int, k: int, S: int, threads: int, max_blocks: int, lanes: int = WARP) -> int:
    """Blocks for one call: a group of `lanes` lanes per secondary slot (a thread per id when
    S is out of range), capped so large T loops instead of rebuilding P in thousands of blocks."""
    if 0 < S < k:
        needed = -(-T * (k - S) // (threads // lanes))
    else:
        needed = -(-T * k // threads)
    return max(1, min(needed, max_blocks))


def after_flags_blocks(T: int, k: int, S: int, threads: int, max_blocks: int) -> int:
    """Blocks for launch 2 of the two-launch path: a thread per secondary slot per round (the
    slots that need a row are queued and scanned by the block's groups), capped."""
    return max(1, min(-(-T * (k - S) // threads), max_blocks))


def scatter_flags_blocks(T: int, S: int, threads: int) -> int:
    """Blocks for launch 1 built by the grid scatter: a thread per head slot (T * S)."""
    return -(-T * S // threads)


def pointer_inputs(topk_ids: torch.Tensor, sim: torch.Tensor) -> tuple[torch.Tensor, str, str, int]:
    """What every pointer launch derives from its tensors: (sim as the kernel reads it, bfloat16
    viewed as int16 bits; its kind; the id type name; the CUDA device index)."""
    sim_kind = TORCH_SIM_KIND[sim.dtype]
    if sim_kind == "bfloat16":
        sim = sim.view(torch.int16)  # no __cuda_array_interface__ needed: raw pointer
    id_name = "int32" if topk_ids.dtype == torch.int32 else "int64"
    device_index = topk_ids.device.index if topk_ids.device.index is not None else torch.cuda.current_device()
    return sim, sim_kind, id_name, device_index


def launch_reroute(
    topk_ids: torch.Tensor,
    sim: torch.Tensor,
    out: torch.Tensor,
    select_top_k: int,
    threshold: float,
    *,
    threads: int = DEFAULT_THREADS,
    max_blocks: int | None = None,
    lanes: int = WARP,
    two_launch: bool | None = None,
    weights: torch.Tensor | None = None,
    flags_build: str | None = None,
) -> None:
    """Write re-routed ids into `out` (contiguous, like topk_ids) on torch's current stream.

    topk_ids [T, k] int32/int64 contiguous, sim [E, E] float32/float16/bfloat16 contiguous.
    No sync; safe inside CUDA-graph capture once the kernels are compiled. The one-launch path
    allocates nothing; the two-launch path (large T, see `use_two_launch`) allocates an
    E-flag int32 workspace per call from torch's allocator (stream-ordered, graph-capturable;
    a cached buffer shared by streams or graphs would race).
    threads / max_blocks / lanes (lanes per secondary slot) are tuning knobs for benchmarks;
    two_launch forces a path (None: the shape rule); flags_build picks how the two-launch path's
    launch 1 builds P (None: FLAGS_BUILD).
    weights [T, k] floating, contiguous: the router's slots are not sorted by weight; the contract
    applies in each token's weight order and ids stay in their own slots. One launch (the
    weight-order kernel) where the shape rule says one; at large T, k > 64 or weights that are not
    float32/float16/bfloat16 (e.g. float64, ordered as given) the slots are sorted with torch
    (argsort, gather), the plain kernel runs, and the ids are scattered back.
    """
    T, k = topk_ids.shape
    E = sim.shape[0]
    if T * k == 0:
        return
    cols = columns_per_lane(E, lanes)
    sim_given = sim
    sim, sim_kind, id_name, device_index = pointer_inputs(topk_ids, sim)
    if max_blocks is None:
        max_blocks = max_blocks_for(device_index)
    S = max(-1, min(int(select_top_k), k))  # keep it in int32; any S <= 0 or >= k is identity
    blocks = grid_blocks(T, k, S, threads, max_blocks, lanes)
    stream_ptr = torch.cuda.current_stream(device_index).cuda_stream
    shape = (np.int32(T), np.int32(k), np.int32(E), np.int32(S))
    if two_launch is None:
        two_launch = use_two_launch(T, k, S)
    if weights is not None:
        if (two_launch and 0 < S < k) or k > MAX_WEIGHTED_K or weights.dtype not in TORCH_SIM_KIND:
            order = weights.argsort(dim=1, descending=True, stable=True)  # T, k
            in_order = topk_ids.gather(1, order)  # T, k
            new_in_order = torch.empty_like(in_order)
            launch_reroute(in_order, sim_given, new_in_order, select_top_k, threshold, threads=threads,
                           max_blocks=max_blocks, lanes=lanes, two_launch=two_launch, flags_build=flags_build)
            out.scatter_(1, order, new_in_order)
            return
        weight_kind = TORCH_SIM_KIND[weights.dtype]
        if weight_kind == "bfloat16":
            weights = weights.view(torch.int16)
        kern = pointer_kernel(id_name, sim_kind, cols, threads, lanes, weight_kind)
        args = (topk_ids.data_ptr(), weights.data_ptr(), sim.data_ptr(), out.data_ptr()) + shape + (np.float32(threshold),)
        kern.launch(blocks, stream_ptr, device_index, args)
        return
    if two_launch and 0 < S < k:
        blocks = after_flags_blocks(T, k, S, threads, max_blocks * TWO_LAUNCH_BLOCKS_PER_SM // BLOCKS_PER_SM)
        build = check_flags_build(flags_build)
        if build == "scatter":
            flags = torch.zeros(E, dtype=torch.int32, device=topk_ids.device)  # the fill: the scatter only sets
            scatter_flags_pointer_kernel(id_name, threads).launch(
                scatter_flags_blocks(T, S, threads), stream_ptr, device_index, (topk_ids.data_ptr(), flags.data_ptr()) + shape)
        else:
            flags = torch.empty(E, dtype=torch.int32, device=topk_ids.device)  # E: every flag gets written
            flags_pointer_kernel(id_name).launch(1, stream_ptr, device_index, (topk_ids.data_ptr(), flags.data_ptr()) + shape)
        kern = after_flags_pointer_kernel(id_name, sim_kind, cols, threads, lanes)
        args = (topk_ids.data_ptr(), sim.data_ptr(), flags.data_ptr(), out.data_ptr()) + shape + (np.float32(threshold),)
        kern.launch(blocks, stream_ptr, device_index, args)
        return
    kern = pointer_kernel(id_name, sim_kind, cols, threads, lanes)
    args = (topk_ids.data_ptr(), sim.data_ptr(), out.data_ptr()) + shape + (np.float32(threshold),)
    kern.launch(blocks, stream_ptr, device_index, args)


def merge_geometry(num_experts: int, top_k: int, tokens: int, select_top_k: int = 1) -> tuple[int, int]:
    """(threads, lanes per secondary slot) of the merging kernel for a call of `tokens` tokens. The
    block takes its secondary slots (T (k - S)) in rounds of threads / lanes, and a second round
    costs a row load after a barrier; so where they outnumber the 32-lane groups, half groups take
    them in one round, if the row still fits 8 columns per lane. Qwen3-30B-A3B (E = 128, k = 8):
    T = 1 / 2 have 7 / 14 slots for 16 groups of 32, T = 3 / 4 have 21 / 28, for 32 groups of 16.
    Measured (bench/lab/probe_merge_geometry.py, H100, bench/RESULTS.md sections 20-21): half groups
    at T = 3 / 4 take 5.0 / 4.6 us against 5.5 / 5.2; at T = 1 / 2 they are 0.3-0.5 us slower.
    A layer so uses at most two kernels, one for its smallest and one for its largest merged call:
    a warm-up at both compiles every kernel its later calls use."""
    if columns_per_lane(num_experts, WARP) > 8:
        return MERGE_THREADS_WIDE_ROWS, WARP
    S = min(max(1, select_top_k), top_k)
    secondary = tokens * (top_k - S)
    half = WARP // 2
    if secondary > MERGE_THREADS // WARP and columns_per_lane(num_experts, half) <= 8:
        return MERGE_THREADS, half
    return MERGE_THREADS, WARP


def launch_reroute_merged(
    topk_ids: torch.Tensor,
    weights: torch.Tensor,
    sim: torch.Tensor,
    out: torch.Tensor,
    weights_out: torch.Tensor,
    select_top_k: int,
    threshold: float,
    *,
    in_weight_order: bool = False,
    threads: int | None = None,
    lanes: int | None = None,
) -> None:
    """Re-route and merge each token's duplicate slots in one launch of ONE block (see
    numba_kernels.make_kernel, merge=True): new ids into `out`, merged weights into `weights_out`.

    topk_ids [T, k] int32/int64, weights and weights_out [T, k] float32, sim [E, E]
    float32/float16/bfloat16, all contiguous. in_weight_order: the slots are not sorted by weight
    (the contract in each token's weight order, as launch_reroute with weights). One block at any
    T: meant for small batches (vLLM's small-batch path has T k 4 <= E), slow at large T.
    """
    T, k = topk_ids.shape
    E = sim.shape[0]
    if T * k == 0:
        return
    if in_weight_order and k > MAX_WEIGHTED_K:
        raise ValueError(f"the weight-order kernel takes k <= {MAX_WEIGHTED_K} slots per token, got k={k}")
    if threads is None or lanes is None:
        geometry = merge_geometry(E, k, T, select_top_k)
        threads, lanes = threads or geometry[0], lanes or geometry[1]
    cols = columns_per_lane(E, lanes)
    sim, sim_kind, id_name, device_index = pointer_inputs(topk_ids, sim)
    S = max(-1, min(int(select_top_k), k))
    kern = merge_pointer_kernel(id_name, sim_kind, cols, threads, lanes, k, in_weight_order)
    args = (topk_ids.data_ptr(), weights.data_ptr(), sim.data_ptr(), out.data_ptr(), weights_out.data_ptr(),
            np.int32(T), np.int32(k), np.int32(E), np.int32(S), np.float32(threshold))
    kern.launch(1, torch.cuda.current_stream(device_index).cuda_stream, device_index, args)
