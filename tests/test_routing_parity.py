"""Parity of the vectorised torch backend with the plain-loop reference, on the CPU.

    pytest tests/test_routing_parity.py

Each case draws fresh random inputs from its own seed. Ids compare exactly. The Numba kernel
has its own parity tests (simulator and GPU).
"""
import itertools

import numpy as np
import pytest
import torch

import sere
from sere.kernels.reference import reroute_reference
from tests.helpers import random_similarity, random_topk_ids

# Extremes and odd sizes, not every value in between.
TOKENS = (1, 2, 33, 256, 4096)
EXPERTS = (8, 60, 64, 128, 256)
TOP_K = (1, 2, 4, 6, 8)
THRESHOLDS = (0.0, 0.35, 0.7, 1.0)

# Every (T, E, k) would be 125 shapes x every S x 4 thresholds: too many. Take every k with
# every S, each against a rotating (T, E) so all sizes appear, plus the largest corner.
CASES = []
for i, (k, rho) in enumerate(itertools.product(TOP_K, THRESHOLDS)):
    T, E = TOKENS[i % len(TOKENS)], EXPERTS[(i // 2) % len(EXPERTS)]
    for S in range(0, k + 1):
        CASES.append((T, E, k, S, rho))
CASES.append((4096, 256, 8, 2, 0.35))


def _check(ids, sim, S, rho):
    want = reroute_reference(ids.numpy(), sim.float().numpy(), S, rho)
    got = sere.reroute(ids, sim, S, rho, backend="torch")
    assert got.dtype == ids.dtype and got.shape == ids.shape
    np.testing.assert_array_equal(got.numpy(), want)
    return got


@pytest.mark.parametrize("T,E,k,S,rho", CASES)
def test_torch_matches_reference(T, E, k, S, rho):
    rng = np.random.default_rng([T, E, k, S, int(rho * 100)])
    ids = random_topk_ids(rng, T, E, k, invalid_frac=0.05)
    sim = random_similarity(rng, E, ties=(T + k) % 2 == 0)
    _check(ids, sim, S, rho)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("sim_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(id_dtype, sim_dtype):
    rng = np.random.default_rng(7)
    ids = random_topk_ids(rng, 64, 60, 6, invalid_frac=0.05, dtype=id_dtype)
    sim = random_similarity(rng, 60, dtype=sim_dtype)
    got = _check(ids, sim, 2, 0.4)
    assert got.dtype == id_dtype


def test_ties_pick_smallest_primary():
    # Expert 5 is equally similar to primaries 1 and 3: it must go to 1.
    ids = torch.tensor([[3, 5], [1, 2]])
    sim = torch.eye(6)
    sim[5, 1] = sim[5, 3] = 0.5
    sim[2, 3] = 0.9
    out = sere.reroute(ids, sim, 1, 0.5, backend="torch")
    assert out.tolist() == [[3, 1], [1, 3]]
    assert reroute_reference(ids.numpy(), sim.numpy(), 1, 0.5).tolist() == [[3, 1], [1, 3]]


def test_threshold_is_inclusive_and_compared_in_float32():
    # float32(0.7) < 0.7: a similarity of exactly float32(0.7) re-routes at rho = 0.7.
    ids = torch.tensor([[0, 1]])
    sim = torch.eye(2)
    sim[1, 0] = 0.7
    for backend in ("torch", "reference"):
        assert sere.reroute(ids, sim, 1, 0.7, backend=backend).tolist() == [[0, 0]]
        assert sere.reroute(ids, sim, 1, 0.70001, backend=backend).tolist() == [[0, 1]]


def test_invalid_ids_pass_through_and_are_never_primary():
    E = 4
    ids = torch.tensor([[-1, 2], [E, 3], [0, -1], [1, E + 3]])
    sim = torch.ones(E, E)
    out = sere.reroute(ids, sim, 1, 0.0, backend="torch")
    # Primary set {0, 1}: 2 and 3 move to 0 (tie, smallest); invalid ids stay.
    assert out.tolist() == [[-1, 0], [E, 0], [0, -1], [1, E + 3]]


def test_empty_primary_set_is_identity():
    ids = torch.tensor([[-1, 2, 3], [-1, 1, 0]])
    sim = torch.ones(4, 4)
    assert torch.equal(sere.reroute(ids, sim, 1, 0.0, backend="torch"), ids)
    assert torch.equal(sere.reroute(ids, sim, 1, float("-inf"), backend="torch"), ids)


def test_zero_tokens():
    ids = torch.zeros((0, 4), dtype=torch.int64)
    out = sere.reroute(ids, torch.eye(8), 2, 0.1, backend="torch")
    assert out.shape == (0, 4)


def test_input_not_modified_and_output_is_new():
    rng = np.random.default_rng(3)
    ids = random_topk_ids(rng, 16, 8, 4)
    before = ids.clone()
    for S in (0, 2, 4):
        out = sere.reroute(ids, random_similarity(rng, 8), S, 0.0, backend="torch")
        assert torch.equal(ids, before)
        assert out.data_ptr() != ids.data_ptr()


def test_auto_on_cpu_is_torch():
    from sere.routing import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_torch_compile_fullgraph_matches_reference():
    compiled = torch.compile(lambda i, s: sere.reroute(i, s, 2, 0.3, backend="torch"), fullgraph=True)
    rng = np.random.default_rng(11)
    for T in (5, 33):
        ids = random_topk_ids(rng, T, 16, 4, invalid_frac=0.1)
        sim = random_similarity(rng, 16)
        want = reroute_reference(ids.numpy(), sim.numpy(), 2, 0.3)
        np.testing.assert_array_equal(compiled(ids, sim).numpy(), want)
