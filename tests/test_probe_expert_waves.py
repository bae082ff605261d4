"""The expert-count probe's routing and block count (bench/lab/probe_expert_waves.py), on the CPU:
the routing must reach exactly n distinct experts whatever n is against k, so that the probe's
x axis is what it says."""
import pytest
import torch

from bench.lab.probe_expert_waves import EXPERT_COUNTS, halved_n, routing_over, working_blocks
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
