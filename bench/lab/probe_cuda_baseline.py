"""Device probe: the research kernel's structure written in CUDA C (compiled by NVRTC through
CuPy), next to the Numba version of the same structure (sere.kernels.research_baseline) and our
one-launch Numba kernel, by CUDA-graph replay. Issue 14, target 3: the Numba baseline takes 6-10
us at T <= 256 where the published kernel, compiled from its source, takes 3.6-4.0 us (H200,
E = 128, k = 8, S = 1); this says whether the gap is the structure as we wrote it or Numba's code
generation. If the C version lands near the published times it is the faithful baseline.
Measured on an H100 (2026-12-06, commit 312dfc9, bench/RESULTS.md section 15): the C version is no
faster than the Numba one (S = 1: 6.2 / 8.6 / 9.5 / 9.3 us at T = 1 / 16 / 64 / 256, 4.2 at 4096):
the gap is in the structure as written, most likely the scan, whose loads each wait on a mask
read; the branch-free scan (sere_scan_branchless) tests that: it is slower. On the H200 (2026-12-06,
commit 0ef8885, section 16) the same, and at T = 4096 the C stand-in's three launches took 3.9-4.0
us where our two took 6.2-8.0. On the H100 (2026-12-07, section 17) our two-launch path with launch 1
as a zeroing fill plus a grid scatter took 5.4-5.5 us at T = 4096 against 6.4 / 8.0 with one block
building the flags, so "scatter" became the default. The scan that reads the mask a 16-byte word
at a time (sere_scan_words) tested the remaining suspect at T <= 256, a mask read per expert, 128
in a row per thread: on the H100 (2026-12-07, section 18) it is the fastest stand-in at T = 1 (4.8
us) and the slowest from T = 64 on (11-15 us). sere_scan_fixed (E fixed at compile time, unrolled,
every load independent; H100, 2026-12-07, section 20) is the fastest stand-in from T = 16 on (5.2-5.7
us at T <= 256) and still about 1.5x the published 3.6-4.0 us. The columns "ours, ..." time our kernel on each path at every T (the shape
rule takes one launch below T = 1024, two from it).

    python -m bench.lab.probe_cuda_baseline [--ids int64|int32|both]   (a CUDA machine with CuPy, repo root)

The three kernels, as a C programmer writes the structure (not a copy of the upstream source):
  clear    one thread per mask entry, mask[E + 2, padded to 16-byte words] = 0
  scatter  one thread per head slot (T x S): mask[id] = 1 (invalid ids to the two spare entries,
           as the contract passes them through)
  scan     one thread per slot (T x k): a secondary slot whose expert is valid and not primary
           walks all E columns, reading sim[e, p] where mask[p] is set, keeps the largest
           (smallest p on ties) and takes it when >= rho; sere_scan_branchless reads every entry of
           the row and selects without a branch; sere_scan_words reads the mask 16 flags per load
           and loads only the primary experts' similarities; sere_scan_fixed is compiled for
           E = 128 and unrolls the walk in full (the mask in 16-byte words, the row in float4s)
Ids int64 (torch's topk) or int32, similarity float32. Each case is checked against
sere.kernels.reference.reroute_reference before it is timed.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings

import numpy as np
import torch

CUDA_SOURCE = r"""
extern "C" __global__ void sere_clear(signed char* mask, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) mask[i] = 0;
}

extern "C" __global__ void sere_scatter(const ID_T* ids, signed char* mask, int T, int k, int E, int S) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * S) return;
    int t = i / S;
    ID_T h = ids[(long long)t * k + (i - t * S)];
    int slot = h < 0 ? E + 1 : (h >= E ? E : (int)h);  // invalid ids are never primary
    mask[slot] = 1;
}

// Whether slot i must scan: a slot keeps its expert when S leaves nothing to re-route, it is a head
// slot, its id is invalid or its expert is already primary (then it is written here).
__device__ inline bool scan_needed(const ID_T* ids, const signed char* mask, ID_T* out, int i, int k, int E,
                                   int S) {
    ID_T e = ids[i];
    if (S <= 0 || S >= k || i % k < S || e < 0 || e >= E || mask[e]) {
        out[i] = e;
        return false;
    }
    return true;
}

// One slot of the scan kernel: walks all E columns. BRANCHLESS reads every entry of the row and
// selects without a branch, so one thread's loads do not wait on its mask reads and can be in
// flight together; otherwise a load waits on the mask read before it (the plain way to write it).
template <bool BRANCHLESS>
__device__ inline void scan_slot(const ID_T* ids, const signed char* mask, const float* sim, ID_T* out,
                                 int T, int k, int E, int S, float rho) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * k || !scan_needed(ids, mask, out, i, k, E, S)) return;
    const float* row = sim + (long long)ids[i] * E;
    float best = 0.0f;
    int best_p = -1;  // strict comparisons below: the smallest p wins ties
    if (BRANCHLESS) {
#pragma unroll 8
        for (int p = 0; p < E; ++p) {
            float v = row[p];
            bool take = mask[p] != 0 && (best_p < 0 || v > best);
            best = take ? v : best;
            best_p = take ? p : best_p;
        }
    } else {
        for (int p = 0; p < E; ++p) {
            if (mask[p]) {
                float v = row[p];
                if (best_p < 0 || v > best) {
                    best = v;
                    best_p = p;
                }
            }
        }
    }
    out[i] = (best_p >= 0 && best >= rho) ? (ID_T)best_p : ids[i];
}

extern "C" __global__ void sere_scan(const ID_T* ids, const signed char* mask, const float* sim, ID_T* out,
                                     int T, int k, int E, int S, float rho) {
    scan_slot<false>(ids, mask, sim, out, T, k, E, S, rho);
}

extern "C" __global__ void sere_scan_branchless(const ID_T* ids, const signed char* mask, const float* sim,
                                                ID_T* out, int T, int k, int E, int S, float rho) {
    scan_slot<true>(ids, mask, sim, out, T, k, E, S, rho);
}
"""
# Compiled with CUDA_SOURCE where NVRTC takes it (uint4, __ffs); without it the other columns stay.
WORDS_SOURCE = r"""
// The mask read a word at a time: one 16-byte load covers 16 experts (the mask is padded to whole
// words and cleared in full), and only the primary experts' similarities are loaded, in ascending
// expert order. A flag is 0 or 1, so each set byte holds one set bit.
extern "C" __global__ void sere_scan_words(const ID_T* ids, const signed char* mask, const float* sim, ID_T* out,
                                          int T, int k, int E, int S, float rho) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * k || !scan_needed(ids, mask, out, i, k, E, S)) return;
    const float* row = sim + (long long)ids[i] * E;
    const uint4* words = reinterpret_cast<const uint4*>(mask);
    float best = 0.0f;
    int best_p = -1;
#pragma unroll 4
    for (int c = 0; c * 16 < E; ++c) {
        uint4 w = words[c];
        unsigned int parts[4] = {w.x, w.y, w.z, w.w};
        for (int q = 0; q < 4; ++q) {
            for (unsigned int bits = parts[q]; bits != 0; bits &= bits - 1) {
                int p = c * 16 + q * 4 + (__ffs(bits) - 1) / 8;
                if (p >= E) break;  // the two spare entries for invalid ids, then padding
                float v = row[p];
                if (best_p < 0 || v > best) {
                    best = v;
                    best_p = p;
                }
            }
        }
    }
    out[i] = (best_p >= 0 && best >= rho) ? (ID_T)best_p : ids[i];
}
"""
# The scan with E fixed when compiled (-DFIXED_E, a multiple of 16): the loop unrolls in full, the
# mask comes in 16-byte words and the row in float4s, all independent of each other, so a thread's
# loads are in flight together instead of one L2 round trip per step; the select is branch-free.
FIXED_SOURCE = r"""
extern "C" __global__ void sere_scan_fixed(const ID_T* ids, const signed char* mask, const float* sim, ID_T* out,
                                          int T, int k, int E, int S, float rho) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * k || !scan_needed(ids, mask, out, i, k, E, S)) return;
    const float4* row = reinterpret_cast<const float4*>(sim + (long long)ids[i] * FIXED_E);
    const uint4* words = reinterpret_cast<const uint4*>(mask);
    float best = 0.0f;
    int best_p = -1;
#pragma unroll
    for (int c = 0; c < FIXED_E / 16; ++c) {
        uint4 w = words[c];
        unsigned int parts[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float4 v4 = row[c * 4 + q];
            float vals[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                bool take = ((parts[q] >> (8 * b)) & 0xFFu) != 0 && (best_p < 0 || vals[b] > best);
                best = take ? vals[b] : best;
                best_p = take ? c * 16 + q * 4 + b : best_p;
            }
        }
    }
    out[i] = (best_p >= 0 && best >= rho) ? (ID_T)best_p : ids[i];
}
"""
SCANS = ("sere_scan", "sere_scan_branchless", "sere_scan_words", "sere_scan_fixed")
OPTIONAL_SCANS = {"sere_scan_words": WORDS_SOURCE, "sere_scan_fixed": FIXED_SOURCE}
THREADS = 128
T_VALUES = (1, 16, 64, 256, 1024, 4096)
E, K, RHO = 128, 8, 0.0


def mask_length(num_experts: int) -> int:
    """The mask's bytes: a flag per expert, two spare entries (invalid ids), padded to whole
    16-byte words for sere_scan_words (torch's allocations are 16-byte aligned)."""
    return -(-(num_experts + 2) // 16) * 16


class CudaBaseline:
    """The three kernels for one id type. prepare(ids, sim, S, rho) returns (launch, out): launch()
    runs them on torch's current stream (so a torch CUDA graph captures them) and writes out."""

    def __init__(self, id_dtype: torch.dtype):
        import os

        os.environ.setdefault("CUPY_CUDA_ARRAY_INTERFACE_SYNC", "0")  # no stream sync when viewing torch memory
        import cupy

        self.cupy = cupy
        id_c = {torch.int64: "long long", torch.int32: "int"}[id_dtype]
        options = ("-std=c++17", f"-DID_T={id_c}", f"-DFIXED_E={E}")
        module = cupy.RawModule(code=CUDA_SOURCE, options=options)
        self.clear, self.scatter = module.get_function("sere_clear"), module.get_function("sere_scatter")
        self.scans = {name: module.get_function(name) for name in SCANS if name not in OPTIONAL_SCANS}
        for name, source in OPTIONAL_SCANS.items():  # each in a module of its own: one failing leaves the rest
            try:
                self.scans[name] = cupy.RawModule(code=CUDA_SOURCE + source, options=options).get_function(name)
            except Exception as err:  # noqa: BLE001 - NVRTC's error types differ across CuPy versions
                print(f"probe_cuda_baseline: {name} left out ({type(err).__name__}: {str(err)[:200]})", file=sys.stderr)

    def prepare(self, ids: torch.Tensor, sim: torch.Tensor, S: int, rho: float, scan: str = "sere_scan"):
        cp, i32 = self.cupy, np.int32
        T, k = ids.shape
        E_ = sim.shape[0]
        out = torch.empty_like(ids)  # T, k
        n_mask = mask_length(E_)
        mask = torch.empty(n_mask, dtype=torch.int8, device=ids.device)  # cleared by the first kernel
        c_ids, c_sim, c_out, c_mask = (cp.asarray(x) for x in (ids, sim, out, mask))  # zero-copy views

        def blocks(n):
            return (max(1, -(-n // THREADS)),)

        scan_fn = self.scans[scan]

        def launch():
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; the replacement is newer than some images
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            with stream:
                self.clear(blocks(n_mask), (THREADS,), (c_mask, i32(n_mask)))
                if 0 < S < k:
                    self.scatter(blocks(T * S), (THREADS,), (c_ids, c_mask, i32(T), i32(k), i32(E_), i32(S)))
                scan_fn(blocks(T * k), (THREADS,), (c_ids, c_mask, c_sim, c_out, i32(T), i32(k), i32(E_), i32(S),
                                                 np.float32(rho)))
            return out

        return launch, out


def ours(launch_reroute, ids: torch.Tensor, sim: torch.Tensor, S: int, **path) -> torch.Tensor:
    out = torch.empty_like(ids)  # T, k
    launch_reroute(ids, sim, out, S, RHO, **path)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", choices=("int64", "int32", "both"), default="both", help="id dtypes to time")
    args = parser.parse_args(argv)
    from bench.test_bench_reroute import make_inputs
    from bench.timing import time_graph_replay
    from sere.kernels.numba_cuda import launch_reroute
    from sere.kernels.reference import reroute_reference
    from sere.kernels.research_baseline import reroute_research_baseline

    if not torch.cuda.is_available():
        print("probe_cuda_baseline: needs a CUDA device", file=sys.stderr)
        return 2
    if importlib.util.find_spec("cupy") is None:
        print("probe_cuda_baseline: needs CuPy (cupy-cuda13x on the device image)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}: us per call, CUDA-graph replay (100 calls x 20), E={E} k={K} rho={RHO}")
    print("| T | S | ids | CUDA C baseline | CUDA C, branch-free scan | CUDA C, mask by 16-byte words | "
          f"CUDA C, E = {E} unrolled | Numba baseline | ours, one launch | ours, two launches, flags by block | "
          "ours, two launches, fill + scatter |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for id_dtype in {"int64": (torch.int64,), "int32": (torch.int32,), "both": (torch.int64, torch.int32)}[args.ids]:
        c_baseline = CudaBaseline(id_dtype)
        for T in T_VALUES:
            for S in (1, 2):
                ids, sim = make_inputs(T, "uniform", "cuda")
                ids = ids.to(id_dtype)
                want = torch.from_numpy(reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), S, RHO))
                fns = {scan: (c_baseline.prepare(ids.contiguous(), sim.contiguous(), S, RHO, scan)[0]
                              if scan in c_baseline.scans else None) for scan in SCANS}
                fns["numba_baseline"] = lambda: reroute_research_baseline(ids, sim, S, RHO)
                fns["one"] = lambda: ours(launch_reroute, ids, sim, S, two_launch=False)
                for build in ("block", "scatter"):  # the two-launch path at every T, either launch 1
                    fns[build] = lambda build=build: ours(launch_reroute, ids, sim, S, two_launch=True, flags_build=build)
                cells = []
                for name, fn in fns.items():
                    if fn is None:
                        cells.append("n/a")
                        continue
                    got = fn()
                    torch.cuda.synchronize()
                    if not torch.equal(got.cpu(), want):
                        cells.append("WRONG")
                        continue
                    cells.append(f"{time_graph_replay(fn, calls=100, repeats=20).median_us:.2f}")
                print(f"| {T} | {S} | {str(id_dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
