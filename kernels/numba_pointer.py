"""The reroute kernels compiled for raw pointers (the real-GPU path) and launched straight
through cuda.core: the Numba type signatures, the launch wrapper `PointerKernel`, and a
process-wide cache of compiled kernels (one per signature and launch geometry).
"""
from __future__ import annotations

import threading

from sere.kernels.numba_kernels import (DEFAULT_THREADS, FLAG_THREADS, WARP, make_flags_kernel, make_kernel,
                                        make_scatter_flags_kernel)
from sere.kernels.numba_runtime import cuda, numba


def numba_type(name: str):
    types = numba.types
    return {
        "int32": types.int32,
        "int64": types.int64,
        "float32": types.float32,
        "float16": types.float16,
        "bfloat16": types.int16,  # bit pattern, widened in the kernel
    }[name]


def pointer_signature(id_name: str, sim_kind: str, weight_kind: str | None = None):
    """void(ids*, sim*, out*, T, k, E, S, rho) for one id dtype and similarity kind; with a
    weight kind, void(ids*, weights*, sim*, out*, T, k, E, S, rho) (the weight-order kernel)."""
    types = numba.types
    idt = numba_type(id_name)
    head = (types.CPointer(idt),)
    if weight_kind is not None:
        head += (types.CPointer(numba_type(weight_kind)),)
    return types.void(
        *head, types.CPointer(numba_type(sim_kind)), types.CPointer(idt),
        types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def merge_signature(id_name: str, sim_kind: str):
    """void(ids*, weights*, sim*, out*, weights_out*, T, k, E, S, rho): the merging kernel
    (weights float32, in and out)."""
    types = numba.types
    idt, f32 = numba_type(id_name), types.CPointer(types.float32)
    return types.void(
        types.CPointer(idt), f32, types.CPointer(numba_type(sim_kind)), types.CPointer(idt), f32,
        types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def after_flags_signature(id_name: str, sim_kind: str):
    """void(ids*, sim*, flags*, out*, T, k, E, S, rho): launch 2 of the two-launch path."""
    types = numba.types
    idt = numba_type(id_name)
    return types.void(
        types.CPointer(idt), types.CPointer(numba_type(sim_kind)), types.CPointer(types.int32),
        types.CPointer(idt), types.int32, types.int32, types.int32, types.int32, types.float32,
    )


def flags_signature(id_name: str):
    """void(ids*, flags*, T, k, E, S): launch 1 of the two-launch path."""
    types = numba.types
    return types.void(types.CPointer(numba_type(id_name)), types.CPointer(types.int32),
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
                   lanes: int = WARP, weight_kind: str | None = None) -> PointerKernel:
    """The compiled reroute kernel for this signature (compiled on first use, then cached);
    with weight_kind, the weight-order kernel (slots not sorted by weight)."""
    return cached_pointer_kernel(
        ("reroute", id_name, sim_kind, cols, threads, lanes, weight_kind),
        lambda: PointerKernel(make_kernel(sim_kind, cols, threads, lanes, weight_kind=weight_kind),
                              pointer_signature(id_name, sim_kind, weight_kind), threads),
    )


def merge_pointer_kernel(id_name: str, sim_kind: str, cols: int, threads: int, lanes: int, top_k: int,
                         in_weight_order: bool = False) -> PointerKernel:
    """The compiled merging kernel for top_k slots per token (one block; slots in weight order when
    in_weight_order)."""
    weight_kind = "float32" if in_weight_order else None
    return cached_pointer_kernel(
        ("merge", id_name, sim_kind, cols, threads, lanes, top_k, in_weight_order),
        lambda: PointerKernel(make_kernel(sim_kind, cols, threads, lanes, weight_kind=weight_kind, merge=True,
                                          top_k=top_k),
                              merge_signature(id_name, sim_kind), threads),
    )


def after_flags_pointer_kernel(id_name: str, sim_kind: str, cols: int, threads: int = DEFAULT_THREADS,
                               lanes: int = WARP) -> PointerKernel:
    """The compiled launch 2 of the two-launch path (compiled on first use, then cached)."""
    return cached_pointer_kernel(
        ("after_flags", id_name, sim_kind, cols, threads, lanes),
        lambda: PointerKernel(make_kernel(sim_kind, cols, threads, lanes, two_launch=True),
                              after_flags_signature(id_name, sim_kind), threads),
    )


def flags_pointer_kernel(id_name: str, threads: int = FLAG_THREADS) -> PointerKernel:
    """The compiled launch 1 of the two-launch path (one block builds all E flags)."""
    return cached_pointer_kernel(
        ("flags", id_name, threads),
        lambda: PointerKernel(make_flags_kernel(threads), flags_signature(id_name), threads),
    )


def scatter_flags_pointer_kernel(id_name: str, threads: int = DEFAULT_THREADS) -> PointerKernel:
    """The compiled launch 1 of the two-launch path over the grid (a thread per head slot, flags
    zeroed by the caller)."""
    return cached_pointer_kernel(
        ("scatter_flags", id_name, threads),
        lambda: PointerKernel(make_scatter_flags_kernel(), flags_signature(id_name), threads),
    )
