"""The CUDA C research-structure baseline of bench/lab/probe_cuda_baseline.py, checked on the host:
its kernels (the scans) compiled as C++ by g++ with one loop standing in for the grid (kernels run one
after another, threads one after another, which these kernels allow: no thread reads what another
thread of the same kernel writes), against the reference on random cases with invalid ids, ties
and every S. The GPU run checks it again before timing it."""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from bench.lab.probe_cuda_baseline import CUDA_SOURCE, FIXED_SOURCE, SCANS, WORDS_SOURCE, mask_length
from sere.kernels.reference import reroute_reference

HOST_PRELUDE = r"""
struct Dim { int x; };
static Dim blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
static inline int __ffs(unsigned int x) { return __builtin_ffs((int)x); }
"""
HOST_DRIVER = r"""
template <class F> static void grid(int n, F f) {
    blockDim.x = 128;
    for (int b = 0; b < (n + 127) / 128 || b == 0; ++b)
        for (int t = 0; t < 128; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}
extern "C" void run(const ID_T* ids, signed char* mask, int mask_len, const float* sim, ID_T* out,
                    int T, int k, int E, int S, float rho, int scan) {
    grid(mask_len, [&] { sere_clear(mask, mask_len); });
    if (S > 0 && S < k) grid(T * S, [&] { sere_scatter(ids, mask, T, k, E, S); });
    if (scan == 0) grid(T * k, [&] { sere_scan(ids, mask, sim, out, T, k, E, S, rho); });
    if (scan == 1) grid(T * k, [&] { sere_scan_branchless(ids, mask, sim, out, T, k, E, S, rho); });
    if (scan == 2) grid(T * k, [&] { sere_scan_words(ids, mask, sim, out, T, k, E, S, rho); });
#ifdef FIXED_E
    if (scan == 3) grid(T * k, [&] { sere_scan_fixed(ids, mask, sim, out, T, k, E, S, rho); });
#endif
}
"""


def check_against_reference(tmp_path, id_dtype, c_type, scan, fixed_e=None, trials=200):
    """Compile the kernels for the host and compare `scan` with the reference on random cases:
    invalid ids (-2, -1, >= E), ties, every S from -1 to k + 1, three thresholds. With fixed_e,
    the scans are compiled for E = fixed_e and every case has that E."""
    src = tmp_path / "baseline.cpp"
    fixed = f"#define FIXED_E {fixed_e}\n" if fixed_e else ""
    src.write_text(HOST_PRELUDE + f"#define ID_T {c_type}\n" + fixed + CUDA_SOURCE + WORDS_SOURCE
                   + (FIXED_SOURCE if fixed_e else "") + HOST_DRIVER)
    lib_path = tmp_path / "baseline.so"
    subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(lib_path), str(src)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    rng = np.random.default_rng(0)
    for trial in range(trials):
        E, k, T = fixed_e or int(rng.integers(1, 70)), int(rng.integers(1, 9)), int(rng.integers(1, 20))
        ids = rng.integers(-2, E + 2, size=(T, k)).astype(id_dtype)  # -2, -1 and >= E: invalid
        sim = rng.random((E, E), dtype=np.float32)
        if trial % 3 == 0:
            sim = np.round(sim * 4) / 4  # ties
        S, rho = int(rng.integers(-1, k + 2)), float(rng.choice([0.0, 0.3, 0.7]))
        out, mask = np.empty_like(ids), np.full(mask_length(E), 7, np.int8)  # dirty: the first kernel clears it
        lib.run(ptr(ids), ptr(mask), len(mask), ptr(sim), ptr(out), T, k, E, S, ctypes.c_float(rho), scan)
        np.testing.assert_array_equal(out, reroute_reference(ids, sim, S, rho), err_msg=f"E={E} k={k} T={T} S={S} rho={rho}")


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the kernels for the host")


@needs_gxx
@pytest.mark.parametrize("scan", [0, 1, 2], ids=list(SCANS[:3]))
@pytest.mark.parametrize("id_dtype,c_type", [(np.int64, "long long"), (np.int32, "int")])
def test_cuda_baseline_source_follows_the_contract(tmp_path, id_dtype, c_type, scan):
    check_against_reference(tmp_path, id_dtype, c_type, scan)


@needs_gxx
@pytest.mark.parametrize("fixed_e", [16, 64])
def test_unrolled_scan_for_a_fixed_e_follows_the_contract(tmp_path, fixed_e):
    assert SCANS[3] == "sere_scan_fixed"
    check_against_reference(tmp_path, np.int64, "long long", 3, fixed_e=fixed_e, trials=100)
