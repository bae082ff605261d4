"""The fused top-k path of the vLLM plugin (sere.vllm.fused_topk, sere.vllm.router.sere_class) on a
stand-in router with vLLM's call shape (select_experts -> _compute_routing), the fused kernel
replaced by its plain-loop reference: which calls take it, that nothing is re-routed twice, and
which layers are refused and why. No vLLM and no GPU needed; the kernel itself is tested in
tests/test_numba_simulator.py and tests/test_gpu_kernels.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sere.config import LayerPlan
from sere.kernels.reference import merge_duplicate_slots_reference, reroute_reference, topk_reroute_reference
from sere.rerouter import LayerRerouter, StatsObserver
from sere.recorder import ExpertStatsRecorder
from sere.transforms import get_transform
from sere.vllm.fused_topk import FusedTopK, why_not
from sere.vllm.router import sere_class

T, E, K, S, RHO = 6, 16, 4, 1, 0.2


class FusedTopKRouter:
    """vLLM's plain router, as far as the plugin sees it (0.26 and 0.32)."""

    def __init__(self, renormalize=True, scoring_func="softmax"):
        self.top_k, self.global_num_experts, self.renormalize, self.scoring_func = K, E, renormalize, scoring_func
        self.eplb_state = None
        self.stock_calls = 0

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        self.stock_calls += 1
        w, ids = torch.softmax(router_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids.to(indices_type or torch.int32)

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        return self._compute_routing(hidden_states, router_logits, topk_indices_dtype)


class CountingTransform:
    def __init__(self):
        self.calls, self.plain = 0, get_transform("sere", backend="torch")

    def __call__(self, ids, sim, s, rho):
        self.calls += 1
        return self.plain(ids, sim, s, rho)


def reference_kernel(calls):
    def kernel(logits, sim, top_k, renormalize, s, rho, ids_dtype=torch.int32, merge=False):
        calls.append(logits.shape[0] if not merge else ("merged", logits.shape[0]))
        w, ids = topk_reroute_reference(logits.numpy(), top_k, renormalize, sim.numpy(), s, rho)
        if merge:
            ids, w = merge_duplicate_slots_reference(ids, w.astype(np.float32), sim.shape[0])
        return torch.from_numpy(w), torch.from_numpy(ids).to(ids_dtype)
    return kernel


def wrapped_router(sim, *, max_tokens=None, fused=True, select_top_k=S, merge_tokens=None, max_fused_tokens=8):
    router = FusedTopKRouter()
    transform = CountingTransform()
    router._sere = LayerRerouter(LayerPlan(0, select_top_k, RHO, max_tokens), sim, transform, sort_slots=False,
                                 backend="torch", merge_tokens=merge_tokens)
    router.__class__ = sere_class(FusedTopKRouter)
    calls = []
    router._sere_fused = (FusedTopK(router._sere, K, True, kernel=reference_kernel(calls),
                                    max_fused_tokens=max_fused_tokens) if fused else None)
    return router, transform, calls


def inputs(seed=0, tokens=T):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 8, generator=gen), torch.randn(tokens, E, generator=gen), torch.rand(E, E, generator=gen)


def test_a_fused_call_runs_one_kernel_and_is_not_rerouted_again():
    hidden, logits, sim = inputs()
    router, transform, calls = wrapped_router(sim)
    w, ids = router.select_experts(hidden, logits)
    rw, rids = topk_reroute_reference(logits.numpy(), K, True, sim.numpy(), S, RHO)
    assert calls == [T] and router.stock_calls == 0 and transform.calls == 0
    assert np.array_equal(ids.long().numpy(), rids) and ids.dtype == torch.int32
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-6)


def test_the_fused_path_gives_the_ids_of_the_two_kernel_path():
    hidden, logits, sim = inputs(1)
    _, fused_ids = wrapped_router(sim)[0].select_experts(hidden, logits, torch.int64)
    router, transform, calls = wrapped_router(sim, fused=False)
    _, ids = router.select_experts(hidden, logits, torch.int64)
    assert calls == [] and router.stock_calls == 1 and transform.calls == 1
    assert torch.equal(ids, fused_ids) and ids.dtype == torch.int64


def test_calls_past_the_fused_limit_take_the_routers_top_k_and_the_re_route_kernel():
    """A fused limit of 4 tokens: calls of up to 4 are fused, a call of 6 runs the router's own top-k and
    then the separate re-route, once, with the same ids the fused path would give."""
    hidden, logits, sim = inputs(4)
    router, transform, calls = wrapped_router(sim, max_fused_tokens=4)
    _, ids = router.select_experts(hidden, logits[:4])
    assert calls == [4] and router.stock_calls == 0 and transform.calls == 0
    _, ids = router.select_experts(hidden, logits)
    _, rids = topk_reroute_reference(logits.numpy(), K, True, sim.numpy(), S, RHO)
    assert calls == [4] and router.stock_calls == 1 and transform.calls == 1
    assert np.array_equal(ids.long().numpy(), rids)


def test_by_default_only_single_token_calls_are_fused():
    sim = torch.rand(E, E)
    rerouter = LayerRerouter(LayerPlan(0, S, RHO, None), sim, get_transform("sere", backend="torch"),
                             sort_slots=False, backend="torch")
    fused = FusedTopK(rerouter, K, True, kernel=reference_kernel([]))
    assert fused.takes(1) and not fused.takes(2)
    with pytest.raises(ValueError, match="max_fused_tokens"):
        FusedTopK(rerouter, K, True, kernel=reference_kernel([]), max_fused_tokens=0)


def test_the_kernels_one_block_bounds_the_fused_calls_that_merge():
    """With the real kernel a fused call merges only within its merging variant's one block
    (MERGE_MAX_TOKENS), however large the layer's merge limit and the fused limit."""
    from sere.kernels.numba_topk_op import MERGE_MAX_TOKENS

    rerouter = LayerRerouter(LayerPlan(0, S, RHO, None), torch.rand(E, E), get_transform("sere", backend="torch"),
                             sort_slots=False, backend="torch", merge_tokens=4 * MERGE_MAX_TOKENS)
    fused = FusedTopK(rerouter, K, True, max_fused_tokens=2 * MERGE_MAX_TOKENS)
    assert fused.takes(MERGE_MAX_TOKENS + 1) and fused.merges(MERGE_MAX_TOKENS)
    assert not fused.merges(MERGE_MAX_TOKENS + 1)


def test_a_merging_layer_merges_in_the_fused_launch_up_to_its_merge_limit():
    """merge_tokens 2 with a fused limit of 3 tokens: calls of 1-2 tokens merge in the fused launch,
    3 is fused without merging, 4 (past the limit) runs the router's top-k and the separate re-route
    (past the merge limit: not merged); a layer without merge_tokens never merges."""
    _, logits, sim = inputs(3, tokens=4)
    sim = torch.full((E, E), 0.9)  # every secondary slot re-routed: duplicates to merge
    router, transform, calls = wrapped_router(sim, merge_tokens=2, max_fused_tokens=3)
    for tokens in (1, 2, 3, 4):
        w, ids = router.select_experts(None, logits[:tokens])
        rw, rids = topk_reroute_reference(logits[:tokens].numpy(), K, True, sim.numpy(), S, RHO)
        if tokens <= 2:
            rids, rw = merge_duplicate_slots_reference(rids, rw.astype(np.float32), E)
            assert (ids == -1).any()  # the merge did something here
        assert np.array_equal(ids.long().numpy(), rids)
        np.testing.assert_allclose(w.numpy(), rw, rtol=1e-6)
    assert calls == [("merged", 1), ("merged", 2), 3] and transform.calls == 1 and router.stock_calls == 1
    plain, _, plain_calls = wrapped_router(sim, merge_tokens=None)
    plain.select_experts(None, logits[:1])
    assert plain_calls == [1]


@pytest.mark.parametrize("max_tokens, select_top_k", [(T - 1, S), (None, K), (None, 0)])
def test_calls_the_rerouter_leaves_alone_run_the_routers_own_top_k(max_tokens, select_top_k):
    hidden, logits, sim = inputs(2)
    router, transform, calls = wrapped_router(sim, max_tokens=max_tokens, select_top_k=select_top_k)
    _, ids = router.select_experts(hidden, logits)
    stock = torch.softmax(logits, dim=-1).topk(K, dim=-1).indices
    assert calls == [] and router.stock_calls == 1 and transform.calls == 0
    assert torch.equal(ids.long(), stock)


def test_a_class_without_compute_routing_keeps_the_wrapper_only():
    class OtherRouter:
        def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None):
            return torch.ones(2, K), torch.arange(2 * K).view(2, K) % E

    cls = sere_class(OtherRouter)
    assert "_compute_routing" not in vars(cls) and "select_experts" in vars(cls)
    router = OtherRouter()
    sim = torch.rand(E, E)
    router._sere = LayerRerouter(LayerPlan(0, 1, 0.0, None), sim, get_transform("sere", backend="torch"),
                                 sort_slots=False, backend="torch")
    router.__class__ = cls
    _, ids = router.select_experts(None, None)
    assert np.array_equal(ids.numpy(), reroute_reference((torch.arange(2 * K).view(2, K) % E).numpy(), sim.numpy(), 1, 0.0))


def test_why_not_names_what_keeps_a_layer_off_the_fused_kernel(monkeypatch):
    sim = torch.rand(E, E)
    rerouter = LayerRerouter(LayerPlan(0, S, RHO, None), sim, get_transform("sere", backend="torch"),
                             sort_slots=False, backend="torch")
    assert why_not(FusedTopKRouter(), rerouter, "numba", "sere") is None
    assert "sigmoid" in why_not(FusedTopKRouter(scoring_func="sigmoid"), rerouter, "numba", "sere")
    assert "not numba" in why_not(FusedTopKRouter(), rerouter, "torch", "sere")
    assert "random" in why_not(FusedTopKRouter(), rerouter, "numba", "random")

    class GroupedTopKRouter(FusedTopKRouter):
        pass

    assert "GroupedTopKRouter" in why_not(GroupedTopKRouter(), rerouter, "numba", "sere")
    observed = LayerRerouter(LayerPlan(0, S, RHO, None), sim, get_transform("sere", backend="torch"),
                             sort_slots=False, backend="torch", observers=[StatsObserver(ExpertStatsRecorder())])
    assert "statistics" in why_not(FusedTopKRouter(), observed, "numba", "sere")
    monkeypatch.setenv("VLLM_MOE_SKIP_PADDING", "1")
    assert "PADDING" in why_not(FusedTopKRouter(), rerouter, "numba", "sere")


def test_warm_up_compiles_the_fused_kernel_for_each_logit_dtype_merging_and_not():
    """Before any graph capture: one fused call per logit dtype the router may give (the model's and
    float32) and per variant its calls take: merging (within the merge limit), plain (past it, or a
    layer that does not merge)."""
    from types import SimpleNamespace

    from sere.vllm.router import MoESite, _router_logit_dtypes, _warm_up

    seen = []

    def kernel(logits, sim, top_k, renormalize, s, rho, ids_dtype=torch.int32, merge=False):
        seen.append((logits.dtype, logits.shape[0], merge))
        return torch.zeros(logits.shape[0], top_k), torch.zeros(logits.shape[0], top_k, dtype=ids_dtype)

    sim = torch.rand(E, E)
    dtypes = _router_logit_dtypes(SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16)))
    assert dtypes == (torch.bfloat16, torch.float32)
    assert _router_logit_dtypes(SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))) == (torch.float32,)
    assert _router_logit_dtypes(None) == (torch.float32,)
    # merge limit 1, fused limit 2: merging at 1 token, plain at 2; merge limit 3: every fused call
    # merges; no merging: plain at 1
    for merge_tokens, want in ((1, [(1, True), (2, False)]), (3, [(1, True)]), (None, [(1, False)])):
        router, _, _ = wrapped_router(sim, merge_tokens=merge_tokens, max_fused_tokens=2)
        router._sere_fused.kernel = kernel
        seen.clear()
        _warm_up(MoESite("model.layers.0.mlp.experts", 0, None, router, E, K), dtypes)
        assert seen == [(d, t, m) for d in dtypes for t, m in want]
