"""The expert-count probe's routing, block count and cost fit (bench/lab/probe_expert_waves.py), on
the CPU: the routing must reach exactly n distinct experts whatever n is against k, so that the
probe's x axis is what it says, and the fit must recover a known fixed cost and rate."""
import pytest
import torch

from bench.lab.probe_expert_waves import (EXPERT_COUNTS, fit_fixed_cost, halved_n,
                                          routing_over, working_blocks)
from sere.stats import distinct_experts


@pytest.mark.parametrize("n", [1, 3, 8, 15, 64, 128])
@pytest.mark.parametrize("T,k", [(1, 8), (16, 8), (64, 4)])
def test_routing_reaches_exactly_n_experts(n, T, k):
    ids, weights = routing_over(n, T, k, E=128, seed=n)
    assert ids.shape == weights.shape == (T, k) and ids.dtype == torch.int32
    assert int(distinct_experts(ids, 128)) == min(n, T * k)
    assert ((ids >= 0) & (ids < 128)).all()
    if n >= k:  # no token holds an expert twice where it need not
        assert all(len(set(row.tolist())) == k for row in ids)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T))


def test_blocks_and_halved_tile():
    assert working_blocks(15, 128, 16, 1536, 64) == 15 * 24  # 9 rows each: one M tile
    assert working_blocks(1, 512, 16, 2048, 128) == 32 * 16  # one expert with 512 rows: 32 M tiles
    assert halved_n({"BLOCK_SIZE_N": 64, "BLOCK_SIZE_M": 16})["BLOCK_SIZE_N"] == 32
    assert halved_n({"BLOCK_SIZE_N": 16})["BLOCK_SIZE_N"] == 16
    assert list(EXPERT_COUNTS) == sorted(EXPERT_COUNTS)


def test_fit_recovers_the_fixed_cost_and_the_rate():
    floor = [18.0, 27.0, 36.0, 72.0, 144.0, 288.0]
    exact = [27.0 + 0.92 * f for f in floor]
    fixed, slope, worst = fit_fixed_cost(floor, exact)
    assert fixed == pytest.approx(27.0) and slope == pytest.approx(0.92) and worst == pytest.approx(0.0, abs=1e-9)
    noisy = [t + (1.5 if i % 2 else -1.5) for i, t in enumerate(exact)]
    fixed, slope, worst = fit_fixed_cost(floor, noisy)
    assert abs(fixed - 27.0) < 2.0 and abs(slope - 0.92) < 0.02 and 1.0 < worst <= 3.0


