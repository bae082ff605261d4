"""RerouteStats against counts made by hand from the reference.

    pytest tests/test_stats.py
"""
import numpy as np
import pytest
import torch

import sere
from sere.kernels.reference import reroute_reference
from tests.helpers import random_similarity, random_topk_ids


def _expected(ids: np.ndarray, sim: np.ndarray, S: int, rho: float) -> dict:
    E = sim.shape[0]
    out = reroute_reference(ids, sim, S, rho)
    valid = lambda a: {int(e) for e in a.flatten() if 0 <= e < E}  # noqa: E731
    primary = valid(ids[:, :S]) if 0 < S < ids.shape[1] else set()
    critical = 0
    if primary:
        for t in range(ids.shape[0]):
            for s in range(S, ids.shape[1]):
                e = int(ids[t, s])
                critical += 0 <= e < E and e not in primary and out[t, s] == e
    return dict(experts_before=len(valid(ids)), experts_after=len(valid(out)),
                rerouted=int((out != ids).sum()), critical=critical)


@pytest.mark.parametrize("T,E,k,S,rho", [(1, 8, 4, 1, 0.0), (33, 60, 6, 2, 0.5), (256, 128, 8, 1, 0.3),
                                         (64, 64, 8, 8, 0.0), (16, 8, 2, 0, 0.0), (40, 32, 4, 2, 1.1)])
def test_stats_match_hand_counts(T, E, k, S, rho):
    rng = np.random.default_rng([T, E, k, S])
    ids = random_topk_ids(rng, T, E, k, invalid_frac=0.05)
    sim = random_similarity(rng, E)
    new_ids, stats = sere.reroute_with_stats(ids, sim, S, rho, backend="torch")
    assert stats.as_dict() == _expected(ids.numpy(), sim.numpy(), S, rho)
    assert all(v.dim() == 0 and v.device == ids.device for v in
               (stats.experts_before, stats.experts_after, stats.rerouted, stats.critical))


def test_stats_with_empty_primary_set_count_nothing_critical():
    ids = torch.tensor([[-1, 2, 3]])
    _, stats = sere.reroute_with_stats(ids, torch.eye(4), 1, 0.0, backend="torch")
    assert stats.as_dict() == dict(experts_before=2, experts_after=2, rerouted=0, critical=0)
