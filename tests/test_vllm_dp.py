"""primary_set "global" inside vLLM (marker `vllm`; the contract itself is
tests/test_global_primary.py): the plugin takes vLLM's DP group only with two ranks or more, and a
real FusedMoE layer re-routes against the DP union. Here because a `-m vllm` run collects only
test_vllm* modules (conftest.py), so in test_global_primary.py these never ran in CI.

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_dp.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sere.config import SereConfig
from sere.kernels.reference import primary_mask_reference, reroute_with_primary_reference
from tests.test_global_primary import StubGroup, in_weight_order, sorted_ids


@pytest.mark.vllm
@pytest.mark.parametrize("dp_size", [None, 1, 2])
def test_the_plugin_takes_vllms_dp_group_only_when_it_has_two_ranks_or_more(monkeypatch, caplog, dp_size):
    from vllm.distributed import parallel_state

    from sere.vllm import router as sere_router

    class DP:  # vLLM's GroupCoordinator, as far as the plugin reads it
        world_size = dp_size

    def get_dp_group():
        if dp_size is None:
            raise AssertionError("data parallel group is not initialized")
        return DP()

    monkeypatch.setattr(parallel_state, "get_dp_group", get_dp_group)
    assert sere_router._primary_group(SereConfig()) is None  # local: vLLM is not even asked
    with caplog.at_level("INFO", logger="vllm.sere"):
        group = sere_router._primary_group(SereConfig(primary_set="global"))
    if dp_size == 2:
        assert isinstance(group, DP) and "union over 2 DP ranks" in caplog.text and "torch implementation" in caplog.text
    else:
        assert group is None and "no collective" in caplog.text


@pytest.mark.vllm
@pytest.mark.parametrize("dp_size", [1, 2])
def test_a_real_fused_moe_layer_reroutes_against_the_dp_union(vllm_world, monkeypatch, tmp_path, dp_size):
    """vLLM's FusedMoE layer (EP rank 0 of 2, tests/test_vllm_ep.py), SERE with primary_set global:
    DP size 1 (vLLM's own DP group) is the local re-router; DP size 2 (a stand-in coordinator that
    adds the other rank's share) re-routes against the union, the ids handed to the experts kernel."""
    from types import SimpleNamespace

    from vllm.distributed import parallel_state

    from sere.artifact import save_similarity
    from sere.harness.vllm_testing import random_similarity as layer_similarity
    from sere.kernels.reference import reroute_reference_in_weight_order
    from sere.vllm import router as sere_router
    from tests import test_vllm_ep as ep

    sim = layer_similarity(ep.E, [ep.LAYER], seed=7)
    save_similarity(tmp_path, sim, {"model_type": "test", "method": "random"})
    sim = sim[ep.LAYER].numpy()
    layer = ep.build_layer(0)
    x, logits = ep.inputs(3, seed=4)
    stock_w, stock_ids = (t.numpy() for t in layer.stock_select(x, logits))
    local = primary_mask_reference(sorted_ids(stock_ids, stock_w), ep.E, 1)
    other = torch.from_numpy(~local).float() * (torch.arange(ep.E) % 2 == 0)  # experts only the other rank has
    assert other.any()
    group = StubGroup(other)
    group.world_size = 2
    if dp_size == 2:
        monkeypatch.setattr(parallel_state, "get_dp_group", lambda: group)
    assert parallel_state.get_dp_group().world_size == dp_size

    vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=str(tmp_path), hf_config=None),
                                  device_config=SimpleNamespace(device="cpu"))
    config = SereConfig(select_top_k=1, threshold=0.0, primary_set="global", source="test")
    sites = sere_router.apply_sere(layer.model, vllm_config, config, device="cpu")
    ids = layer.forward(x, logits)["topk_ids"].numpy()
    local_want = reroute_reference_in_weight_order(stock_ids, stock_w, sim, 1, 0.0)
    if dp_size == 1:
        assert sites[0].router._sere.primary_group is None and group.handed == []
        assert np.array_equal(ids, local_want)
    else:
        union = local | (other.numpy() > 0)
        want = in_weight_order(stock_ids, stock_w, lambda o: reroute_with_primary_reference(o, sim, 1, 0.0, union))
        assert sites[0].router._sere.primary_group is group and len(group.handed) == 1
        assert np.array_equal(ids, want) and not np.array_equal(want, local_want)
