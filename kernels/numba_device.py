"""Device primitives of the reroute kernels, in a real-GPU and a simulator flavour.

The CUDA simulator (NUMBA_ENABLE_CUDASIM=1) has neither warp shuffles nor libdevice, so there
the group argmax goes through shared memory and block barriers, and the bfloat16 widening
through NumPy. The kernel bodies (numba_kernels) are the same in both worlds.
`SIM_LOADERS` maps a similarity kind to the device function that reads one value as float32.
"""
from __future__ import annotations

import numpy as np

from sere.kernels.numba_runtime import cuda, numba, simulator_enabled

if cuda is not None and not simulator_enabled():
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def group_argmax(value, index, lanes, scratch_v, scratch_i):
        """Butterfly over each aligned group of `lanes` lanes: every lane ends with the group's
        max value, the smallest index among ties."""
        offset = lanes // 2
        while offset > 0:
            other_v = cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            other_i = cuda.shfl_xor_sync(0xFFFFFFFF, index, offset)
            # Selects, not a branch: lanes disagree here, and a divergent branch costs more than
            # both moves (bench/RESULTS.md section 22, the merge step).
            better = (other_v > value) | ((other_v == value) & (other_i < index))
            value = other_v if better else value
            index = other_i if better else index
            offset >>= 1
        return value, index

    @cuda.jit(device=True, inline=True)
    def group_sum(value, lanes, scratch_v):
        """Butterfly over each aligned group of `lanes` lanes: every lane ends with the group's sum
        (the same order of additions in every lane, so the same bits)."""
        offset = lanes // 2
        while offset > 0:
            value = value + cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            offset >>= 1
        return value

    @cuda.jit(device=True, inline=True)
    def bf16_bits_to_f32(bits):
        # bfloat16 is the top half of a float32: widen the 16 bits and reinterpret.
        return libdevice.int_as_float(numba.int32((numba.int32(bits) & 0xFFFF) << 16))

elif cuda is not None:

    @cuda.jit(device=True)
    def group_argmax(value, index, lanes, scratch_v, scratch_i):
        """Simulator stand-in for the shuffle butterfly: every lane of the group gets the same
        result through shared memory. Every thread of the block must call it (two block barriers)."""
        tid = cuda.threadIdx.x
        scratch_v[tid] = value
        scratch_i[tid] = index
        cuda.syncthreads()
        first = tid - tid % lanes
        best_v = scratch_v[first]
        best_i = scratch_i[first]
        for j in range(first + 1, first + lanes):
            if scratch_v[j] > best_v or (scratch_v[j] == best_v and scratch_i[j] < best_i):
                best_v = scratch_v[j]
                best_i = scratch_i[j]
        cuda.syncthreads()  # nobody overwrites the scratch before the whole group has read it
        return best_v, best_i

    @cuda.jit(device=True)
    def group_sum(value, lanes, scratch_v):
        """Simulator stand-in for the butterfly sum: pairwise in the butterfly's order through
        shared memory, so every lane gets the bits the GPU gives. Every thread of the block must
        call it (block barriers)."""
        tid = cuda.threadIdx.x
        first = tid - tid % lanes
        offset = lanes // 2
        while offset > 0:
            scratch_v[tid] = value
            cuda.syncthreads()
            value = value + scratch_v[first + ((tid - first) ^ offset)]
            cuda.syncthreads()
            offset >>= 1
        return value

    @cuda.jit(device=True)
    def bf16_bits_to_f32(bits):
        widened = np.array([(int(bits) & 0xFFFF) << 16], dtype=np.uint32)
        return widened.view(np.float32)[0]


if cuda is not None:

    @cuda.jit(device=True, inline=True)
    def to_f32(value):
        return numba.float32(value)

    SIM_LOADERS = {"float32": to_f32, "float16": to_f32, "bfloat16": bf16_bits_to_f32}
