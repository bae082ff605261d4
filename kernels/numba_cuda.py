"""Numba CUDA kernel of the SERE routing contract (one launch; two at large T), as the custom op `sere::reroute`.

Run its checks: `pytest tests/test_numba_simulator.py` (CPU, CUDA simulator, NumPy inputs) and
`pytest -m gpu tests/test_gpu_kernels.py` (a CUDA GPU). The contract is written out in
`sere.routing`; the oracle every test compares with is `sere.kernels.reference.reroute_reference`.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots,
K2 = k - S secondary slots per token, P = primary set.

How the kernel works (one launch, no other kernels, no host sync):
  1. Each warp (a group of `lanes` lanes, 32 on the GPU) owns one secondary slot (t, S + r) at a
     time and, before any barrier, loads the slot's expert e and the row sim[e, :] into
     registers (lane l holds columns l, l+32, ...): those loads fly while the block builds P.
  2. Every block builds P itself in shared memory from slots 0..S-1 of ALL tokens (a flag per
     expert: clear, barrier, set, barrier). Redundant across blocks, but at decode sizes it is
     a few hundred L2-resident ids, and it removes the separate clear/scatter launches of the
     research kernel. At prefill sizes this redundant read dominates (22 - 33 us at T = 4096),
     hence the two-launch path below.
  3. Each lane takes the best primary column among its own (value, then smallest index), a
     butterfly shuffle gives the warp's argmax, lane 0 writes the new id. Blocks loop over
     slots grid-stride, so the grid stays small for large T (each block rebuilds P once).
Large T (T >= TWO_LAUNCH_MIN_TOKENS, a rule on shapes and S only, so graph- and compile-safe):
two launches instead. Launch 1, one block, builds P in shared memory from all head ids and writes
all E flags to a per-call int32 workspace (no clearing launch needed); launch 2 is the kernel
above with P copied from that workspace (E reads per block instead of T*S), and a group reads
its slot's flag BEFORE loading the row, skipping the row for primary and invalid ids. Same ids,
bit for bit. Measured on an H100: 13 us at T = 4096 (S = 1, 2) against 22 / 33 us in one launch;
the baseline is still faster there (7 us): see bench/results/kernel.md.
Invalid ids (< 0 or >= E) are never primary and pass through; S <= 0, S >= k, or an empty P
give the input back (the kernel then only copies).
Measured on an H100 (bench/results/kernel.md): 2.3 - 3.5 us per call in CUDA-graph replay for
T <= 256, E = 128, k = 8.

Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the same kernel body runs with two
primitives swapped, since the simulator has neither warp shuffles nor libdevice: the group
argmax goes through shared memory and block barriers, and the bfloat16 widening through NumPy.
There the NumPy entry uses groups of 4 lanes, as every simulated barrier is slow.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import torch

if not hasattr(np, "row_stack"):
    # NumPy 2.5 removed the row_stack alias of vstack; numba-cuda 0.30 still registers an
    # overload for it when its typing registry loads (the first kernel compile) and fails.
    np.row_stack = np.vstack

try:  # numba-cuda is an optional dependency (extra `cuda`)
    import numba
    from numba import cuda

    _NUMBA_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only where numba is missing
    numba = cuda = None
    _NUMBA_ERROR = exc

WARP = 32
# Kernels are compiled for a fixed number of similarity columns per lane (the row prefetch
# lives in registers, so its length must be a compile-time constant): E <= 32 * bucket.
COLUMNS_PER_LANE_BUCKETS = (4, 8, 16, 32)
MAX_EXPERTS = WARP * COLUMNS_PER_LANE_BUCKETS[-1]  # 1024: beyond, the prefetch spills registers
DEFAULT_THREADS = 256  # 8 warps per block
BLOCKS_PER_SM = 4  # grid cap: enough warps in flight, few redundant builds of P
SIM_KINDS = ("float32", "float16", "bfloat16")
# Large-T path: from this many tokens on, launch 1 builds P once into a flags buffer and launch 2
# reads it (bench/results/kernel.md, "Large T: the two-launch path"; H100: one launch wins at
# T <= 256, two win from T = 1024 for S = 1 and 2). A token count, not T*S, so that decode
# batches (T <= 256) stay on the one-launch kernel whatever S.
TWO_LAUNCH_MIN_TOKENS = 1024
FLAG_THREADS = 1024  # the one block of launch 1: T*S / 1024 head ids per thread
_NO_EXPERT = 0x7FFFFFFF  # index sentinel: loses every tie against a real expert


def simulator_enabled() -> bool:
    """True when Numba runs CUDA kernels in its Python simulator (NUMBA_ENABLE_CUDASIM=1)."""
    return cuda is not None and bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


@lru_cache(maxsize=None)
def available() -> bool:
    """True where numba-cuda imports and drives a real CUDA device (False under the simulator)."""
    if cuda is None or simulator_enabled():
        return False
    try:
        if not cuda.is_available():
            return False
        cuda.current_context()  # creates (or binds) the primary context torch also uses
        return True
    except Exception:
        return False


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


# ---------------------------------------------------------------------------------------------
# Device primitives, in a real-GPU and a simulator flavour.
# ---------------------------------------------------------------------------------------------
if cuda is not None and not simulator_enabled():
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _group_argmax(value, index, lanes, scratch_v, scratch_i):
        """Butterfly over each aligned group of `lanes` lanes: every lane ends with the group's
        max value, the smallest index among ties."""
        offset = lanes // 2
        while offset > 0:
            other_v = cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            other_i = cuda.shfl_xor_sync(0xFFFFFFFF, index, offset)
            if other_v > value or (other_v == value and other_i < index):
                value = other_v
                index = other_i
            offset >>= 1
        return value, index

    @cuda.jit(device=True, inline=True)
    def _bf16_bits_to_f32(bits):
        # bfloat16 is the top half of a float32: widen the 16 bits and reinterpret.
        return libdevice.int_as_float(numba.int32((numba.int32(bits) & 0xFFFF) << 16))

elif cuda is not None:

    @cuda.jit(device=True)
    def _group_argmax(value, index, lanes, scratch_v, scratch_i):
        """Simulator stand-in for the shuffle butterfly: the group's lane 0 gets the same result
        through shared memory. Every thread of the block must call it (two block barriers)."""
        tid = cuda.threadIdx.x
        scratch_v[tid] = value
        scratch_i[tid] = index
        cuda.syncthreads()
        best_v = value
        best_i = index
        if tid % lanes == 0:  # only lane 0 uses the result: spare the simulator the rest
            for j in range(tid + 1, tid + lanes):
                if scratch_v[j] > best_v or (scratch_v[j] == best_v and scratch_i[j] < best_i):
                    best_v = scratch_v[j]
                    best_i = scratch_i[j]
        cuda.syncthreads()  # nobody overwrites the scratch before the whole warp has read it
        return best_v, best_i

    @cuda.jit(device=True)
    def _bf16_bits_to_f32(bits):
        widened = np.array([(int(bits) & 0xFFFF) << 16], dtype=np.uint32)
        return widened.view(np.float32)[0]


if cuda is not None:

    @cuda.jit(device=True, inline=True)
    def _to_f32(value):
        return numba.float32(value)

    SIM_LOADERS = {"float32": _to_f32, "float16": _to_f32, "bfloat16": _bf16_bits_to_f32}


def _make_kernel(sim_kind: str, cols: int, threads: int, lanes: int = WARP, two_launch: bool = False):
    """The kernel body for one similarity kind, columns-per-lane bucket, block size and group
    size (`lanes` lanes share one secondary slot: 32 on the GPU, fewer under the simulator,
    where every block barrier is expensive). two_launch=True gives launch 2 of the large-T path
    (P read from a flags buffer) instead of the one-launch kernel.

    Arrays are flat (1-D NumPy arrays under the simulator, raw pointers on the GPU):
    ids [T*k], sim [E*E] (bfloat16 as int16 bits), out [T*k], flags [E] int32.
    """
    if lanes < 1 or lanes > WARP or lanes & (lanes - 1) or threads % lanes or threads % WARP:
        raise ValueError(f"lanes must be a power of two <= {WARP} and threads a multiple of {WARP}")
    load_f32 = SIM_LOADERS[sim_kind]
    group_argmax = _group_argmax
    mask_len = lanes * cols
    groups_per_block = threads // lanes
    neg_inf = np.float32(-np.inf)
    no_expert = _NO_EXPERT
    # The two kernels share their per-slot work through these; on the GPU they are inlined at
    # NVVM level, so `row` (a local array) still lives in registers after unrolling.
    device_fn = cuda.jit(device=True) if simulator_enabled() else cuda.jit(device=True, forceinline=True)

    @device_fn
    def load_row(row, sim, e, E, lane):
        """This lane's columns of similarity row e: row[c] = sim[e, lane + lanes*c]."""
        for c in range(cols):
            j = lane + lanes * c
            if j < E:
                row[c] = load_f32(sim[e * E + j])

    @device_fn
    def best_primary(row, is_primary, E, lane):
        """(value, index) of this lane's most similar primary column; (-inf, no_expert) if none.
        Ascending columns with a strict > keep the smallest index among ties."""
        best_v = neg_inf
        best_i = no_expert
        for c in range(cols):
            j = lane + lanes * c
            if j < E and is_primary[j] != 0:
                if best_i == no_expert or row[c] > best_v:
                    best_v = row[c]
                    best_i = j
        return best_v, best_i

    def reroute_kernel(ids, sim, out, T, k, E, S, rho):
        is_primary = cuda.shared.array(mask_len, numba.int32)  # E flags
        scratch_v = cuda.shared.array(threads, numba.float32)  # used by the simulator only
        scratch_i = cuda.shared.array(threads, numba.int64)
        tid = cuda.threadIdx.x
        lane = tid % lanes
        group = tid // lanes
        block = cuda.blockIdx.x
        blocks = cuda.gridDim.x

        if S <= 0 or S >= k:  # identity: copy, grid-stride
            for i in range(block * threads + tid, T * k, blocks * threads):
                out[i] = ids[i]
            return

        K2 = k - S
        n_head = T * S
        n_sec = T * K2

        # 1. Prefetch this group's first secondary slot and its similarity row (before barriers).
        row = cuda.local.array(cols, numba.float32)  # registers after unrolling
        slot = block * groups_per_block + group
        e = -1
        pos = 0
        if slot < n_sec:
            t = slot // K2
            pos = t * k + S + (slot - t * K2)
            e = ids[pos]
        if e >= 0 and e < E:
            load_row(row, sim, e, E, lane)

        # 2. The primary set P, built by every block from slots 0..S-1 of all tokens.
        for j in range(tid, E, threads):
            is_primary[j] = 0
        cuda.syncthreads()
        for i in range(tid, n_head, threads):
            t = i // S
            h = ids[t * k + (i - t * S)]
            if h >= 0 and h < E:
                is_primary[h] = 1
            if (i // threads) % blocks == block:  # one block copies each primary slot
                out[t * k + (i - t * S)] = h
        cuda.syncthreads()

        # 3. Re-route: one group per secondary slot; the trip count is uniform per block.
        base = block * groups_per_block
        while base < n_sec:
            best_v = neg_inf
            best_i = no_expert
            if e >= 0 and e < E and is_primary[e] == 0:
                best_v, best_i = best_primary(row, is_primary, E, lane)
            best_v, best_i = group_argmax(best_v, best_i, lanes, scratch_v, scratch_i)
            if lane == 0 and slot < n_sec:
                if best_i != no_expert and best_v >= rho:
                    out[pos] = best_i
                else:
                    out[pos] = e  # invalid, already primary, critical, or P empty

            base += blocks * groups_per_block  # this group's next slot, loaded after the barriers
            slot = base + group
            e = -1
            if slot < n_sec:
                t = slot // K2
                pos = t * k + S + (slot - t * K2)
                e = ids[pos]
            if e >= 0 and e < E:
                load_row(row, sim, e, E, lane)

    def reroute_after_flags_kernel(ids, sim, flags, out, T, k, E, S, rho):
        """Launch 2 of the two-launch path: P comes from flags [E] (written by launch 1), so a
        group knows whether its slot's expert is primary before it loads the row, and skips the
        load for primary and invalid ids. Called only with 0 < S < k."""
        is_primary = cuda.shared.array(mask_len, numba.int32)  # E flags, copied from flags
        scratch_v = cuda.shared.array(threads, numba.float32)  # used by the simulator only
        scratch_i = cuda.shared.array(threads, numba.int64)
        tid = cuda.threadIdx.x
        lane = tid % lanes
        group = tid // lanes
        block = cuda.blockIdx.x
        blocks = cuda.gridDim.x
        K2 = k - S
        n_head = T * S
        n_sec = T * K2

        # 1. This group's first slot: the row is loaded (before the barrier) only if it is needed.
        row = cuda.local.array(cols, numba.float32)  # registers after unrolling
        slot = block * groups_per_block + group
        e = -1
        pos = 0
        needs_row = False
        if slot < n_sec:
            t = slot // K2
            pos = t * k + S + (slot - t * K2)
            e = ids[pos]
            needs_row = e >= 0 and e < E and flags[e] == 0
        if needs_row:
            load_row(row, sim, e, E, lane)

        # 2. P into shared memory (E reads per block, not T*S); the primary slots copy through.
        for j in range(tid, E, threads):
            is_primary[j] = flags[j]
        for i in range(block * threads + tid, n_head, blocks * threads):
            t = i // S
            out[t * k + (i - t * S)] = ids[t * k + (i - t * S)]
        cuda.syncthreads()

        # 3. Re-route, as in the one-launch kernel; slots that need no row do no column work.
        base = block * groups_per_block
        while base < n_sec:
            best_v = neg_inf
            best_i = no_expert
            if needs_row:
                best_v, best_i = best_primary(row, is_primary, E, lane)
            best_v, best_i = group_argmax(best_v, best_i, lanes, scratch_v, scratch_i)
            if lane == 0 and slot < n_sec:
                if best_i != no_expert and best_v >= rho:
                    out[pos] = best_i
                else:
                    out[pos] = e  # invalid, already primary, critical, or P empty

            base += blocks * groups_per_block
            slot = base + group
            e = -1
            needs_row = False
            if slot < n_sec:
                t = slot // K2
                pos = t * k + S + (slot - t * K2)
                e = ids[pos]
                needs_row = e >= 0 and e < E and is_primary[e] == 0
            if needs_row:
                load_row(row, sim, e, E, lane)

    return reroute_after_flags_kernel if two_launch else reroute_kernel


def _make_flags_kernel(threads: int):
    """Launch 1 of the two-launch path, ONE block of `threads` threads: the primary flags of all
    E experts from slots 0..S-1 of all tokens, built in shared memory and written out whole
    (every flag is written, so the buffer needs no clearing launch). Called only with 0 < S < k.
    ids [T*k], flags [E] int32."""

    def primary_flags_kernel(ids, flags, T, k, E, S):
        mask = cuda.shared.array(MAX_EXPERTS, numba.int32)
        tid = cuda.threadIdx.x
        for j in range(tid, E, threads):
            mask[j] = 0
        cuda.syncthreads()
        for i in range(tid, T * S, threads):
            t = i // S
            h = ids[t * k + (i - t * S)]
            if h >= 0 and h < E:
                mask[h] = 1
        cuda.syncthreads()
        for j in range(tid, E, threads):
            flags[j] = mask[j]

    return primary_flags_kernel


# ---------------------------------------------------------------------------------------------
# Real GPU: kernels compiled for raw pointers, launched straight through cuda.core.
# ---------------------------------------------------------------------------------------------
TORCH_SIM_KIND = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TORCH_ID_TYPES = (torch.int32, torch.int64)


def _numba_type(name: str):
    types = numba.types
    return {
        "int32": types.int32,
        "int64": types.int64,
        "float32": types.float32,
        "float16": types.float16,
        "bfloat16": types.int16,  # bit pattern, widened in the kernel
    }[name]


def pointer_signature(id_name: str, sim_kind: str):
    """void(ids*, sim*, out*, T, k, E, S, rho) for one id dtype and similarity kind."""
    types = numba.types
    idt = _numba_type(id_name)
    return types.void(
        types.CPointer(idt), types.CPointer(_numba_type(sim_kind)), types.CPointer(idt),
        types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def after_flags_signature(id_name: str, sim_kind: str):
    """void(ids*, sim*, flags*, out*, T, k, E, S, rho): launch 2 of the two-launch path."""
    types = numba.types
    idt = _numba_type(id_name)
    return types.void(
        types.CPointer(idt), types.CPointer(_numba_type(sim_kind)), types.CPointer(types.int32),
        types.CPointer(idt), types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def flags_signature(id_name: str):
    """void(ids*, flags*, T, k, E, S): launch 1 of the two-launch path."""
    types = numba.types
    return types.void(types.CPointer(_numba_type(id_name)), types.CPointer(types.int32),
                      types.int32, types.int32, types.int32, types.int32)


class PointerKernel:
    """A kernel compiled for one pointer signature plus the fastest way to launch it:
    cuda.core's `launch` with a cached LaunchConfig, stream wrapper and kernel handle (what
    numba's own launch ends in, after per-call argument marshalling that costs microseconds).
    Falls back to numba's launch if the installed numba-cuda lays things out differently."""

    def __init__(self, py_kernel, signature, threads: int):
        self.threads = threads
        self.dispatcher = cuda.jit(signature)(py_kernel)
        self.compiled = self.dispatcher.overloads[signature.args]
        self._configs: dict[int, object] = {}
        self._handles: dict[int, object] = {}
        self._streams: dict[int, object] = {}
        self.direct = None
        self.fallback_reason = ""
        for module in ("cuda.core", "cuda.core.experimental"):
            try:
                mod = __import__(module, fromlist=["launch"])
                self.direct = (mod.launch, mod.LaunchConfig, mod.Stream)
                break
            except Exception:
                continue

    def _handle(self, device_index: int):
        handle = self._handles.get(device_index)
        if handle is None:
            with cuda.gpus[device_index]:  # load the module into that device's context, once
                handle = self.compiled._codelibrary.get_cufunc().kernel
            self._handles[device_index] = handle
        return handle

    def launch(self, blocks: int, stream_ptr: int, device_index: int, args: tuple) -> None:
        """args: pointers as Python ints, scalars as NumPy scalars of the signature's types."""
        if self.direct is not None:
            try:
                launch, LaunchConfig, Stream = self.direct
                config = self._configs.get(blocks)
                if config is None:
                    config = self._configs[blocks] = LaunchConfig(grid=blocks, block=self.threads)
                stream = self._streams.get(stream_ptr)
                if stream is None:
                    stream = self._streams[stream_ptr] = Stream.from_handle(stream_ptr)
                launch(stream, config, self._handle(device_index), *args)
                return
            except Exception as exc:  # noqa: BLE001 - a real launch error re-raises just below
                self.direct = None  # not the numba-cuda layout we expect: numba's launch from now on
                self.fallback_reason = repr(exc)
        self.compiled.launch(args, blocks, self.threads, _numba_stream(stream_ptr), 0)


def _numba_stream(stream_ptr: int):
    """The stream object numba's own launch takes (a cuda.core stream in numba-cuda >= 0.2x)."""
    stream = cuda.external_stream(stream_ptr) if stream_ptr else 0
    to_core = getattr(cuda.cudadrv.driver, "_to_core_stream", None)
    return to_core(stream) if to_core is not None else stream


_build_lock = threading.Lock()
_pointer_kernels: dict[tuple, PointerKernel] = {}


def cached_pointer_kernel(key: tuple, build) -> PointerKernel:
    """The PointerKernel for `key`, built (compiled) by `build()` on first use."""
    kern = _pointer_kernels.get(key)
    if kern is None:
        with _build_lock:
            kern = _pointer_kernels.get(key)
            if kern is None:
                kern = _pointer_kernels[key] = build()
    return kern


def pointer_kernel(id_name: str, sim_kind: str, cols: int, threads: int = DEFAULT_THREADS,
                   lanes: int = WARP) -> PointerKernel:
    """The compiled reroute kernel for this signature (compiled on first use, then cached)."""
    return cached_pointer_kernel(
        ("reroute", id_name, sim_kind, cols, threads, lanes),
        lambda: PointerKernel(_make_kernel(sim_kind, cols, threads, lanes), pointer_signature(id_name, sim_kind),
                              threads),
    )


def after_flags_pointer_kernel(id_name: str, sim_kind: str, cols: int, threads: int = DEFAULT_THREADS,
                               lanes: int = WARP) -> PointerKernel:
    """The compiled launch 2 of the two-launch path (compiled on first use, then cached)."""
    return cached_pointer_kernel(
        ("after_flags", id_name, sim_kind, cols, threads, lanes),
        lambda: PointerKernel(_make_kernel(sim_kind, cols, threads, lanes, two_launch=True),
                              after_flags_signature(id_name, sim_kind), threads),
    )


def flags_pointer_kernel(id_name: str, threads: int = FLAG_THREADS) -> PointerKernel:
    """The compiled launch 1 of the two-launch path (one block builds all E flags)."""
    return cached_pointer_kernel(
        ("flags", id_name, threads),
        lambda: PointerKernel(_make_flags_kernel(threads), flags_signature(id_name), threads),
    )


def use_two_launch(T: int, k: int, S: int) -> bool:
    """The shape rule (shapes and S only: graph- and compile-safe): two launches once T reaches
    TWO_LAUNCH_MIN_TOKENS (read at call time, so tests can lower it), where the one-launch
    kernel's per-block rebuild of P from all T*S head ids costs more than a second launch."""
    return 0 < S < k and T >= TWO_LAUNCH_MIN_TOKENS


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
) -> None:
    """Write re-routed ids into `out` (contiguous, like topk_ids) on torch's current stream.

    topk_ids [T, k] int32/int64 contiguous, sim [E, E] float32/float16/bfloat16 contiguous.
    No sync; safe inside CUDA-graph capture once the kernels are compiled. The one-launch path
    allocates nothing; the two-launch path (large T, see `use_two_launch`) allocates an
    E-flag int32 workspace per call from torch's allocator (stream-ordered, graph-capturable;
    a cached buffer shared by streams or graphs would race).
    threads / max_blocks / lanes (lanes per secondary slot) are tuning knobs for benchmarks;
    two_launch forces a path (None: the shape rule).
    """
    T, k = topk_ids.shape
    E = sim.shape[0]
    if T * k == 0:
        return
    cols = columns_per_lane(E, lanes)
    sim_kind = TORCH_SIM_KIND[sim.dtype]
    if sim_kind == "bfloat16":
        sim = sim.view(torch.int16)  # no __cuda_array_interface__ needed: raw pointer
    id_name = "int32" if topk_ids.dtype == torch.int32 else "int64"
    device_index = topk_ids.device.index if topk_ids.device.index is not None else torch.cuda.current_device()
    if max_blocks is None:
        max_blocks = max_blocks_for(device_index)
    S = max(-1, min(int(select_top_k), k))  # keep it in int32; any S <= 0 or >= k is identity
    blocks = grid_blocks(T, k, S, threads, max_blocks, lanes)
    stream_ptr = torch.cuda.current_stream(device_index).cuda_stream
    shape = (np.int32(T), np.int32(k), np.int32(E), np.int32(S))
    if two_launch is None:
        two_launch = use_two_launch(T, k, S)
    if two_launch and 0 < S < k:
        flags = torch.empty(E, dtype=torch.int32, device=topk_ids.device)  # E: every flag gets written
        flags_pointer_kernel(id_name).launch(1, stream_ptr, device_index, (topk_ids.data_ptr(), flags.data_ptr()) + shape)
        kern = after_flags_pointer_kernel(id_name, sim_kind, cols, threads, lanes)
        args = (topk_ids.data_ptr(), sim.data_ptr(), flags.data_ptr(), out.data_ptr()) + shape + (np.float32(threshold),)
        kern.launch(blocks, stream_ptr, device_index, args)
        return
    kern = pointer_kernel(id_name, sim_kind, cols, threads, lanes)
    args = (topk_ids.data_ptr(), sim.data_ptr(), out.data_ptr()) + shape + (np.float32(threshold),)
    kern.launch(blocks, stream_ptr, device_index, args)


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


def warm_up(id_dtypes=_TORCH_ID_TYPES, sim_dtypes=tuple(TORCH_SIM_KIND), num_experts: int = 128, device=None) -> None:
    """Compile and load the kernels for these dtypes before CUDA-graph capture."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    for id_dtype in id_dtypes:
        ids = torch.zeros(1, 2, dtype=id_dtype, device=device)
        for sim_dtype in sim_dtypes:
            sim = torch.zeros(num_experts, num_experts, dtype=sim_dtype, device=device)
            reroute_numba(ids, sim, 1, 0.0)
            launch_reroute(ids, sim, torch.empty_like(ids), 1, 0.0, two_launch=True)  # the large-T path
    torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# NumPy entry: the same kernel on host arrays (simulator or GPU), for the simulator job.
# ---------------------------------------------------------------------------------------------
_NUMPY_SIM_KIND = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


@lru_cache(maxsize=None)
def _array_kernel(sim_kind: str, cols: int, threads: int, lanes: int, two_launch: bool = False):
    return cuda.jit(_make_kernel(sim_kind, cols, threads, lanes, two_launch))


@lru_cache(maxsize=None)
def _array_flags_kernel(threads: int):
    return cuda.jit(_make_flags_kernel(threads))


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
) -> np.ndarray:
    """The kernel on NumPy arrays; returns new ids (same shape and dtype).

    ids [T, k] int32/int64; sim [E, E] float32/float16 (float64 is cast to float32, as the
    contract compares in float32), or int16/uint16 bfloat16 bit patterns with bf16_bits=True.
    Works under the CUDA simulator (defaults there: 32 threads, groups of 4 lanes, at most 2
    blocks, so the grid-stride loop runs several rounds; each block barrier costs the simulator
    dearly) and on a real GPU (32 lanes, 256 threads; numba copies the arrays both ways).
    two_launch forces the large-T path on or off (None: `use_two_launch`, as on torch tensors).
    """
    if cuda is None:
        raise RuntimeError(f"numba-cuda is not importable: {_NUMBA_ERROR}")
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
    if two_launch and 0 < S < k:
        flags = cuda.to_device(np.full(E, -1, dtype=np.int32))  # E: -1 so an unwritten flag shows
        _array_flags_kernel(threads)[1, threads](ids_flat, flags, *shape)
        _array_kernel(sim_kind, cols, threads, lanes, True)[blocks, threads](
            ids_flat, sim_flat, flags, out_flat, *shape, np.float32(threshold))
        return out
    kernel = _array_kernel(sim_kind, cols, threads, lanes)
    kernel[blocks, threads](ids_flat, sim_flat, out_flat, *shape, np.float32(threshold))
    return out
