"""Vectorised expert-similarity metrics against the pairwise loop, as a speed-up in one run.

    pytest bench/test_bench_calibration.py -s                     # CPU: small shapes, table at the end
    pytest bench/test_bench_calibration.py --benchmark-disable    # smoke: validate each case once
    pytest bench/test_bench_calibration.py -s                     # GPU: one real layer (below)
    SERE_BENCH_SIZE=real|small    force the shapes (default: real on CUDA, small on the CPU)

Real size (the issue's target case): one layer of 128 experts, hidden 2048, 12,800 calibration
tokens (Qwen3-30B-A3B-like), float32 expert outputs on the GPU; small: 16 experts, hidden 64,
256 tokens. Outputs are synthetic but structured (each expert a random mix of 8 shared
sources plus its own noise), so similarities spread over [0, 1] as real ones do.

Each case first validates: the vectorised matrix must equal the pairwise loop
(`sere.calibration.metrics.pairwise_similarity`, one metric call per pair, as the research
code did) on the sampled pairs. Then it times the loop on those pairs and extrapolates to all
E(E-1)/2 pairs (at real size the full loop would take minutes per case; the small size runs
every pair, no extrapolation), and times the vectorised call, each call once
(bench/timing.py `seconds_of_one_call`: CUDA events on the GPU, perf_counter on the CPU).
extra_info: shapes, pairs timed, loop seconds per pair and extrapolated, vectorised seconds
(median), speed-up, and whether the >= 20x target is met.
Index letters: E = experts, N = tokens, D = hidden size.
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from bench.timing import seconds_of_one_call
from sere.calibration.metrics import pairwise_similarity, similarity_matrix

SIZE = os.environ.get("SERE_BENCH_SIZE") or ("real" if torch.cuda.is_available() else "small")
if SIZE not in ("real", "small"):
    raise ValueError(f"SERE_BENCH_SIZE must be 'real' or 'small', got {SIZE!r}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = {"real": (128, 12800, 2048), "small": (16, 256, 64)}  # E, N, D
# (method, kernel, loop pairs timed at real size): CKA pairs cost milliseconds each, the others less.
CASES = (
    ("cka", "linear", 16),
    ("cka", "rbf", 8),
    ("cka", "polynomial", 8),
    ("cosine", "linear", 64),
    ("frobenius", "linear", 64),
)
TARGET_SPEEDUP = 20.0
VECTORISED_ROUNDS = 3
SOURCES = 8
SEED = 0

_rows: list[dict] = []


@pytest.fixture(scope="module")
def outputs():
    """Structured synthetic expert outputs on the bench device: E, N, D float32."""
    e, n, d = SHAPES[SIZE]
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    base = torch.randn(SOURCES, n, d, device=DEVICE, generator=gen)  # S, N, D
    mix = torch.rand(e, SOURCES, device=DEVICE, generator=gen) ** 4  # E, S: a few dominant sources
    out = torch.einsum("es,snd->end", mix, base)  # E, N, D
    out += 0.2 * torch.randn(e, n, d, device=DEVICE, generator=gen)
    yield out
    del out
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module", autouse=True)
def summary_table():
    yield
    if _rows:
        from tabulate import tabulate

        print(f"\nexpert similarity, vectorised vs pairwise loop ({SIZE}: E, N, D = {SHAPES[SIZE]}, {_device_name()})")
        print(tabulate(_rows, headers="keys", floatfmt=".4g"))


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"


def _sample_pairs(e: int, count: int | None) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(e) for j in range(i + 1, e)]
    if count is None or count >= len(pairs):
        return pairs
    pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SEED))[:count]
    return [pairs[p] for p in sorted(pick.tolist())]


@pytest.mark.parametrize("method,kernel,loop_pairs", CASES, ids=[f"{m}-{k}" if m == "cka" else m for m, k, _ in CASES])
def test_vectorised_vs_pairwise_loop(benchmark, outputs, method, kernel, loop_pairs):
    e, n, d = outputs.shape
    pairs = _sample_pairs(e, loop_pairs if SIZE == "real" else None)

    # Validate first: the vectorised matrix equals the loop on the sampled pairs.
    sim = similarity_matrix(outputs, method, kernel)  # E, E (also the warm-up)
    loop_seconds = []
    ref = pairwise_similarity(outputs, method, kernel, pairs=pairs[:1])  # warm-up of the loop's kernels
    loop_seconds.append(seconds_of_one_call(lambda: ref.copy_(pairwise_similarity(outputs, method, kernel, pairs=pairs))))
    rows, cols = zip(*pairs)
    got, want = sim.cpu()[list(rows), list(cols)], ref[list(rows), list(cols)]
    if method == "frobenius":
        # The loop normalises by the largest distance among the sampled pairs only: compare distances' ratios.
        got, want = (1 - got) / (1 - got).max(), (1 - want) / (1 - want).max()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert torch.isfinite(sim).all() and sim.min() >= 0 and sim.max() <= 1

    vec_seconds: list[float] = []

    def vectorised():
        vec_seconds.append(seconds_of_one_call(lambda: similarity_matrix(outputs, method, kernel)))

    benchmark.pedantic(vectorised, rounds=VECTORISED_ROUNDS, iterations=1, warmup_rounds=0)
    total_pairs = e * (e - 1) // 2
    loop_per_pair = loop_seconds[0] / len(pairs)
    loop_total = loop_per_pair * total_pairs
    vec = statistics.median(vec_seconds)
    info = {
        "method": method if method != "cka" else f"cka-{kernel}",
        "E": e,
        "N": n,
        "D": d,
        "pairs_total": total_pairs,
        "pairs_timed": len(pairs),
        "loop_s_per_pair": loop_per_pair,
        "loop_s_all_pairs": loop_total,
        "loop_extrapolated": len(pairs) < total_pairs,
        "vectorised_s": vec,
        "speedup": loop_total / vec,
        "target_met": loop_total / vec >= TARGET_SPEEDUP,
        "timer": "cuda events" if DEVICE == "cuda" else "perf_counter",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    benchmark.extra_info.update(info)
    _rows.append({k: info[k] for k in ("method", "pairs_timed", "loop_s_per_pair", "loop_s_all_pairs", "vectorised_s", "speedup")})
