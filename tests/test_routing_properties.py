"""Hypothesis property tests of the routing contract (torch backend, checked against the
reference where an exact answer is needed).

    pytest tests/test_routing_properties.py
"""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sere
from sere.kernels.reference import reroute_reference
from sere.stats import distinct_experts


@st.composite
def routing_cases(draw):
    E = draw(st.integers(1, 40))
    k = draw(st.integers(1, 8))
    T = draw(st.integers(0, 24))
    ids = draw(st.lists(st.lists(st.integers(-2, E + 2), min_size=k, max_size=k), min_size=T, max_size=T))
    ids = torch.tensor(ids, dtype=torch.int64).reshape(T, k)
    levels = draw(st.sampled_from([2, 5, 1000]))  # few levels = many ties
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.round(np.random.default_rng(seed).random((E, E)) * levels) / levels
    sim = torch.from_numpy(a.astype(np.float32))
    S = draw(st.integers(-1, k + 1))
    rho = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, float(a.max()) + 0.01]))
    return ids, sim, S, rho


PROPS = settings(max_examples=200, deadline=None)


@PROPS
@given(routing_cases())
def test_matches_reference(case):
    ids, sim, S, rho = case
    want = reroute_reference(ids.numpy(), sim.numpy(), S, rho)
    np.testing.assert_array_equal(sere.reroute(ids, sim, S, rho, backend="torch").numpy(), want)


@PROPS
@given(routing_cases())
def test_primary_slots_never_change(case):
    ids, sim, S, rho = case
    out = sere.reroute(ids, sim, S, rho, backend="torch")
    s = max(S, 0)
    assert torch.equal(out[:, :s], ids[:, :s])


@PROPS
@given(routing_cases())
def test_every_output_is_the_input_or_a_primary_expert(case):
    ids, sim, S, rho = case
    E = sim.shape[0]
    out = sere.reroute(ids, sim, S, rho, backend="torch")
    head = ids[:, : max(S, 0)]
    primary = set(int(e) for e in head.flatten() if 0 <= e < E)
    for a, b in zip(ids.flatten().tolist(), out.flatten().tolist()):
        assert b == a or b in primary


@PROPS
@given(routing_cases())
def test_distinct_experts_never_grow(case):
    ids, sim, S, rho = case
    E = sim.shape[0]
    new_ids, stats = sere.reroute_with_stats(ids, sim, S, rho, backend="torch")
    assert int(distinct_experts(new_ids, E)) <= int(distinct_experts(ids, E))
    d = stats.as_dict()
    assert d["experts_after"] <= d["experts_before"]
    assert d["rerouted"] == int((new_ids != ids).sum())


@PROPS
@given(routing_cases())
def test_s_at_least_k_is_identity(case):
    ids, sim, _, rho = case
    k = ids.shape[1]
    for S in (k, k + 3, 0, -1):
        assert torch.equal(sere.reroute(ids, sim, S, rho, backend="torch"), ids)


@PROPS
@given(routing_cases())
def test_threshold_above_every_similarity_is_identity(case):
    ids, sim, S, _ = case
    rho = float(sim.max()) + 1e-3
    assert torch.equal(sere.reroute(ids, sim, S, rho, backend="torch"), ids)
