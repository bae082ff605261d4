"""Device probe (issue 14, merge_slots): what the merging kernel's merge step costs, piece by piece.

probe_merge_geometry showed the merging kernel about 1.1 us slower than the plain kernel even at
S = k, where both only copy the slots and the merging one also merges them (H100, 2026-12-07:
2.42 against 1.32 us at T = 1, E = 128, k = 8). This times one-block kernels that add one piece at
a time to a plain copy of the T*k slots, by CUDA-graph replay:

  copy          out = ids
  copy2         out = ids, w_out = w (the second array)
  staged        ids and w into shared memory, a barrier, then both written out
  merged        staged, plus the merge: each slot compares its token's k slots (int64 index math, as
                the kernel's merge step)
  merged32      merged with int32 index math (the division s // k in 32 bits)
  select        merged32 without branches in the loop (every slot's id and weight read, selects)
  fixed_k       select with k fixed at compile time (the loop unrolled in full)

    python -m bench.lab.probe_merge_step [--top-k 8] [--tokens 1,4] [--threads 256,512]

Measured on the H100 (bench/RESULTS.md section 22): merged 2.22, select 1.50, fixed_k 1.26 us at
T = 1 against 1.18 for staged alone; the cost was the compare loop's divergent branches. The kernel's
merge step now has the fixed_k form (the merging kernel is compiled for the layer's k).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

PIECES = ("copy", "copy2", "staged", "merged", "merged32", "select", "fixed_k")


def make_piece(name: str, threads: int, top_k: int = 8):
    from sere.kernels.numba_runtime import cuda, numba

    def copy(ids, w, out, w_out, n, k):
        for i in range(cuda.threadIdx.x, n, threads):
            out[i] = ids[i]

    def copy2(ids, w, out, w_out, n, k):
        for i in range(cuda.threadIdx.x, n, threads):
            out[i] = ids[i]
            w_out[i] = w[i]

    def staged(ids, w, out, w_out, n, k):
        s_ids = cuda.shared.array(threads, numba.int64)
        s_w = cuda.shared.array(threads, numba.float32)
        tid = cuda.threadIdx.x
        if tid < n:
            s_ids[tid] = ids[tid]
            s_w[tid] = w[tid]
        cuda.syncthreads()
        if tid < n:
            out[tid] = s_ids[tid]
            w_out[tid] = s_w[tid]

    def merged(ids, w, out, w_out, n, k):
        s_ids = cuda.shared.array(threads, numba.int64)
        s_w = cuda.shared.array(threads, numba.float32)
        tid = cuda.threadIdx.x
        if tid < n:
            s_ids[tid] = ids[tid]
            s_w[tid] = w[tid]
        cuda.syncthreads()
        for s in range(tid, n, threads):
            row0 = (s // k) * k
            j = s - row0
            e = s_ids[s]
            acc = s_w[s]
            repeat = False
            for i in range(k):
                if i != j and s_ids[row0 + i] == e:
                    if i < j:
                        repeat = True
                    else:
                        acc += s_w[row0 + i]
            out[s] = -1 if repeat else e
            w_out[s] = np.float32(0.0) if repeat else acc

    def merged32(ids, w, out, w_out, n, k):
        s_ids = cuda.shared.array(threads, numba.int32)
        s_w = cuda.shared.array(threads, numba.float32)
        tid = cuda.threadIdx.x
        if tid < n:
            s_ids[tid] = ids[tid]
            s_w[tid] = w[tid]
        cuda.syncthreads()
        if tid < n:
            s = numba.int32(tid)
            row0 = numba.int32(s // k) * k
            j = numba.int32(s - row0)
            e = s_ids[s]
            acc = s_w[s]
            repeat = False
            for i in range(k):
                i32 = numba.int32(i)
                if i32 != j and s_ids[row0 + i32] == e:
                    if i32 < j:
                        repeat = True
                    else:
                        acc += s_w[row0 + i32]
            out[s] = -1 if repeat else e
            w_out[s] = np.float32(0.0) if repeat else acc

    def make_select(fixed_k):
        def select(ids, w, out, w_out, n, k):
            s_ids = cuda.shared.array(threads, numba.int32)
            s_w = cuda.shared.array(threads, numba.float32)
            tid = cuda.threadIdx.x
            if tid < n:
                s_ids[tid] = ids[tid]
                s_w[tid] = w[tid]
            cuda.syncthreads()
            kk = numba.int32(fixed_k) if fixed_k else numba.int32(k)
            if tid < n:
                s = numba.int32(tid)
                row0 = numba.int32(s // kk) * kk
                j = numba.int32(s - row0)
                e = s_ids[s]
                acc = s_w[s]
                repeat = False
                for i in range(kk):
                    i32 = numba.int32(i)
                    e_i = s_ids[row0 + i32]
                    w_i = s_w[row0 + i32]
                    same = e_i == e
                    repeat = repeat or (same and i32 < j)
                    acc = acc + w_i if same and i32 > j else acc
                out[s] = -1 if repeat else e
                w_out[s] = np.float32(0.0) if repeat else acc
        return select

    return {"copy": copy, "copy2": copy2, "staged": staged, "merged": merged, "merged32": merged32,
            "select": make_select(0), "fixed_k": make_select(top_k)}[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", default="1,4")
    parser.add_argument("--threads", default="256,512")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_merge_step: needs a CUDA device", file=sys.stderr)
        return 2
    from bench.timing import time_graph_replay
    from sere.kernels.numba_pointer import PointerKernel
    from sere.kernels.numba_runtime import numba

    types = numba.types
    i32p, f32p = types.CPointer(types.int32), types.CPointer(types.float32)
    signature = types.void(i32p, f32p, i32p, f32p, types.int32, types.int32)
    k = args.top_k
    thread_counts = [int(x) for x in args.threads.split(",")]
    print(f"{torch.cuda.get_device_name()}: us per call, CUDA-graph replay, one block, k={k}")
    print("| T | threads | " + " | ".join(PIECES) + " |")
    print("|---:|---:|" + "---:|" * len(PIECES))
    device = torch.cuda.current_device()
    for T in map(int, args.tokens.split(",")):
        n = T * k
        ids = torch.randint(0, 4, (n,), dtype=torch.int32, device="cuda")  # duplicates to merge
        w = torch.rand(n, device="cuda")
        out, w_out = torch.empty_like(ids), torch.empty_like(w)
        for threads in thread_counts:
            if n > threads:
                continue
            cells = []
            for name in PIECES:
                kern = PointerKernel(make_piece(name, threads, k), signature, threads)
                launch_args = (ids.data_ptr(), w.data_ptr(), out.data_ptr(), w_out.data_ptr(), np.int32(n), np.int32(k))
                run = lambda: kern.launch(1, torch.cuda.current_stream().cuda_stream, device, launch_args)  # noqa: B023,E731
                run()
                torch.cuda.synchronize()
                cells.append(f"{time_graph_replay(run).median_us:.2f}")
            print(f"| {T} | {threads} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
