"""Merging each token's duplicate slots after re-routing (sere.routing.merge_duplicate_slots, the
re-router's route_merged, the merge_slots setting) on the CPU: the torch implementation equals the
plain-loop reference bit for bit, the MoE mixture is unchanged, and the re-router merges exactly
in the calls it should. The numba kernel that merges inside the re-route launch is checked in
tests/test_numba_simulator.py (simulator) and tests/test_gpu_kernels.py (GPU).
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sere.config import LayerPlan, SereConfig
from sere.kernels.reference import merge_duplicate_slots_reference
from sere.rerouter import LayerRerouter
from sere.routing import merge_duplicate_slots, reroute
from sere.transforms import get_transform
from tests.helpers import random_similarity, random_topk_ids


def duplicated_ids(rng, T, E, k, dtype=torch.int64):
    """Ids as re-routing leaves them: few experts, so a token often holds one in several slots,
    with -1 and >= E (invalid, never merged) sprinkled in."""
    ids = torch.from_numpy(rng.integers(0, min(E, 3), size=(T, k)))
    hit = torch.from_numpy(rng.random((T, k)) < 0.1)
    ids = torch.where(hit, torch.from_numpy(rng.choice([-1, E, E + 2], size=(T, k))), ids)
    return ids.to(dtype)


@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (1, 8, 4), (7, 16, 8), (33, 60, 6)])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_equals_reference_bit_for_bit(T, E, k, w_dtype):
    rng = np.random.default_rng([T, E, k])
    ids = duplicated_ids(rng, T, E, k, dtype=torch.int32 if k % 2 else torch.int64)
    weights = torch.from_numpy(rng.random((T, k)).astype(np.float32)).to(w_dtype)
    got_ids, got_w = merge_duplicate_slots(ids, weights, E)
    want_ids, want_w = merge_duplicate_slots(ids, weights, E, backend="reference")
    assert got_ids.dtype == ids.dtype and got_w.dtype == w_dtype
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_w.view(torch.int16 if w_dtype != torch.float32 else torch.int32),
                       want_w.view(torch.int16 if w_dtype != torch.float32 else torch.int32))
    if k > 1:
        assert bool((got_ids == -1).sum() > (ids == -1).sum())  # something was merged


def test_hand_case_and_the_mixture_is_unchanged():
    """[3, 3, 5, 3] -> [3, -1, 5, -1] with w0 + w1 + w3 (added in slot order) in slot 0; invalid
    ids (-1, 9 >= E) stay; sum_i w_i y(e_i) is the same before and after."""
    ids = torch.tensor([[3, 3, 5, 3], [1, 2, 1, 2], [0, 9, 9, -1], [0, 1, 2, 4]], dtype=torch.int32)
    weights = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.2, 0.2, 0.1], [0.25] * 4])
    m_ids, m_w = merge_duplicate_slots(ids, weights, 6)
    assert m_ids.tolist() == [[3, -1, 5, -1], [1, 2, -1, -1], [0, 9, 9, -1], [0, 1, 2, 4]]
    assert m_w[0, 0].item() == ((torch.tensor(0.4) + 0.3) + 0.1).item()
    assert (m_w[m_ids == -1][:4] == 0).all() and torch.equal(m_w[2:], weights[2:])
    y = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))  # each expert's output, a stand-in

    def mixture(i, w):
        keep = (i >= 0) & (i < 6)
        return (w.unsqueeze(-1) * y[i.clamp(0, 9).long()] * keep.unsqueeze(-1)).sum(1)

    torch.testing.assert_close(mixture(m_ids, m_w), mixture(ids, weights))


def test_inputs_are_not_modified_and_errors_are_one_line():
    ids = torch.tensor([[1, 1]])
    weights = torch.tensor([[0.5, 0.5]])
    merge_duplicate_slots(ids, weights, 4)
    assert ids.tolist() == [[1, 1]] and weights.tolist() == [[0.5, 0.5]]
    with pytest.raises(ValueError, match="one shape"):
        merge_duplicate_slots(ids, weights[:, :1], 4)
    with pytest.raises(TypeError, match="floating"):
        merge_duplicate_slots(ids, ids, 4)
    with pytest.raises(TypeError, match="integer"):
        merge_duplicate_slots(weights, weights, 4)
    with pytest.raises(ValueError, match="backend"):
        merge_duplicate_slots(ids, weights, 4, backend="numba")
    assert merge_duplicate_slots(ids[:0], weights[:0], 4)[0].shape == (0, 2)


def rerouter(sim, S, *, merge_tokens, max_tokens=None, sort_slots=False, observers=None):
    return LayerRerouter(LayerPlan(0, S, 0.0, max_tokens), sim, get_transform("sere", backend="torch"),
                         sort_slots=sort_slots, backend="torch", merge_tokens=merge_tokens, observers=observers)


@pytest.mark.parametrize("sort_slots", [False, True])
def test_route_merged_is_reroute_then_merge_up_to_merge_tokens(sort_slots):
    rng = np.random.default_rng(3)
    E, k = 16, 4
    sim = random_similarity(rng, E)
    layer = rerouter(sim, 1, merge_tokens=2, sort_slots=sort_slots)
    for T in (1, 2, 3):
        ids = random_topk_ids(rng, T, E, k)
        weights = torch.from_numpy(rng.random((T, k)).astype(np.float32))
        if not sort_slots:
            weights = weights.sort(dim=1, descending=True).values
        got_w, got_ids = layer.route_merged(ids, weights)
        new_ids = layer(ids, weights)
        if T <= 2:
            want_ids, want_w = merge_duplicate_slots(new_ids, weights, E)
            assert bool((got_ids == -1).any())  # S = 1, rho = 0 at T <= 2: slots pile on 1-2 experts
        else:
            want_ids, want_w = new_ids, weights
            assert got_w is weights  # untouched past merge_tokens
        assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)


def test_route_merged_leaves_identity_off_and_max_tokens_calls_alone():
    rng = np.random.default_rng(4)
    sim = random_similarity(rng, 8)
    ids = random_topk_ids(rng, 2, 8, 4)
    weights = torch.full((2, 4), 0.25)
    for layer in (rerouter(sim, 0, merge_tokens=4), rerouter(sim, 4, merge_tokens=4),  # identity settings
                  rerouter(sim, 1, merge_tokens=None),  # merging off
                  rerouter(sim, 1, merge_tokens=4, max_tokens=1)):  # T = 2 > max_tokens: left alone
        w, new = layer.route_merged(ids, weights)
        assert w is weights and torch.equal(new, layer(ids, weights)), layer
        assert not bool((new == -1).any())
    with pytest.raises(ValueError, match="merge_tokens"):
        rerouter(sim, 1, merge_tokens=0)


def test_route_merged_with_an_observer_sees_the_unmerged_ids():
    seen = []

    class Spy:
        needs_weights = False

        def on_route(self, rerouter, ids_in, new_in, weights_in, skipped):
            seen.append(new_in.clone())

    sim = torch.full((8, 8), 0.5)
    layer = rerouter(sim, 1, merge_tokens=2, observers=[Spy()])
    ids = torch.tensor([[2, 5, 6]])
    w, new = layer.route_merged(ids, torch.tensor([[0.5, 0.3, 0.2]]))
    assert seen[0].tolist() == [[2, 2, 2]] and new.tolist() == [[2, -1, -1]]
    assert torch.equal(reroute(ids, sim, 1, 0.0), seen[0])


def test_config_merge_slots():
    assert SereConfig.from_dict({"merge_slots": True}).merge_slots is True
    assert SereConfig().merge_slots is None  # auto: on where the kernel merges (sere.vllm.router)
    assert SereConfig.from_dict({"merge_slots": False}).merge_slots is False
    both = SereConfig(merge_slots=True, fuse_topk=True)  # the fused kernel merges in its own launch
    assert both.merge_slots is True and both.fuse_topk
    with pytest.raises(TypeError, match="merge_slots"):
        SereConfig(merge_slots="yes")


def test_reference_adds_in_slot_order():
    """Three slots on one expert: ((w0 + w1) + w2) in float32, as the kernel adds."""
    w = np.array([[1e8, 1.0, -1e8]], dtype=np.float32)
    _, merged = merge_duplicate_slots_reference(np.array([[2, 2, 2]]), w, 4)
    assert merged[0, 0] == np.float32(np.float32(1e8 + 1.0) - np.float32(1e8))


# ---------------------------------------------------------------------------- the vLLM wrapper

class StandInRouter:
    """vLLM's router as the plugin's wrapper sees it: select_experts -> (weights, ids)."""

    top_k = 4

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        w, ids = torch.softmax(router_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        return w, ids.to(torch.int32)


def test_the_vllm_wrapper_returns_merged_weights_and_ids_in_small_calls():
    from sere.vllm.router import sere_class

    E = 16
    sim = torch.full((E, E), 0.5)
    router = StandInRouter()
    router._sere = rerouter(sim, 1, merge_tokens=1)
    router.__class__ = sere_class(StandInRouter)
    logits = torch.randn(2, E, generator=torch.Generator().manual_seed(0))
    w1, ids1 = router.select_experts(None, logits[:1])
    stock_w, stock_ids = StandInRouter().select_experts(None, logits[:1])
    assert ids1.tolist() == [[stock_ids[0, 0].item(), -1, -1, -1]]
    assert torch.allclose(w1.sum(), stock_w.sum()) and w1[0, 1:].eq(0).all()
    w2, ids2 = router.select_experts(None, logits)  # 2 tokens > merge_tokens: re-routed, not merged
    assert not bool((ids2 == -1).any()) and torch.equal(w2, StandInRouter().select_experts(None, logits)[0])


def test_merge_tokens_follow_vllms_small_batch_rule_and_the_check_names_the_kernel():
    from types import SimpleNamespace

    from sere.vllm.router import MoESite, merge_tokens, resolve_merge_support

    def site(E, k, experts_cls, expert_map=None, merge=2, layer=0):
        quant = SimpleNamespace(experts_cls=experts_cls)
        module = SimpleNamespace(routed_experts=SimpleNamespace(quant_method=quant), expert_map=expert_map)
        router = SimpleNamespace(_sere=SimpleNamespace(merge_tokens=merge))
        return MoESite(f"model.layers.{layer}.mlp.experts", layer, module, router, E, k)

    triton = type("TritonExperts", (), {})
    assert merge_tokens(site(128, 8, triton)) == 4  # Qwen3-30B-A3B: T k 4 <= E up to T = 4
    assert merge_tokens(site(60, 4, triton)) == 3 and merge_tokens(site(64, 6, triton)) == 2
    assert merge_tokens(site(16, 8, triton)) is None  # never the small-batch path
    fine = site(128, 8, triton)  # bf16, or FP8 on the Triton backend
    fine.module.routed_experts.quant_method.moe_quant_config = SimpleNamespace(
        use_int8_w8a16=False, use_int4_w4a16=False, block_shape=[128, 128])  # FP8 w8a8 blocks: small-batch path
    resolve_merge_support([fine], required=True)
    assert fine.router._sere.merge_tokens == 2
    resolve_merge_support([site(128, 8, type("CutlassExperts", (), {}), merge=None)], required=True)  # off: not checked
    with pytest.raises(ValueError, match="layer 0: merge_slots needs vLLM's Triton fused MoE.*CutlassExperts"):
        resolve_merge_support([site(128, 8, type("CutlassExperts", (), {}))], required=True)
    for subclass in ("TritonWNA16Experts", "Nvfp4QuantizationEmulationTritonExperts"):  # other paths
        with pytest.raises(ValueError, match=subclass):
            resolve_merge_support([site(128, 8, type(subclass, (triton,), {}))], required=True)
    int8_blocks = site(128, 8, triton)
    int8_blocks.module.routed_experts.quant_method.moe_quant_config = SimpleNamespace(
        use_int8_w8a16=True, use_int4_w4a16=False, block_shape=[1, 128])
    with pytest.raises(ValueError, match="weight-only block quantization"):
        resolve_merge_support([int8_blocks], required=True)
    with pytest.raises(ValueError, match="expert map"):
        resolve_merge_support([site(128, 8, triton, expert_map=torch.arange(128))], required=True)


def test_merge_slots_unset_stops_merging_where_the_expert_kernel_cannot_take_it(caplog):
    """merge_slots unset (auto): a layer whose expert kernel cannot take merged slots stops merging
    (no error), one log line per reason names the layers; the others keep merging."""
    import logging
    from types import SimpleNamespace

    from sere.vllm.router import MoESite, resolve_merge_support

    def site(layer, experts_cls, expert_map=None):
        quant = SimpleNamespace(experts_cls=experts_cls)
        module = SimpleNamespace(routed_experts=SimpleNamespace(quant_method=quant), expert_map=expert_map)
        return MoESite(f"model.layers.{layer}.mlp.experts", layer, module,
                       SimpleNamespace(_sere=SimpleNamespace(merge_tokens=4)), 128, 8)

    triton, cutlass = type("TritonExperts", (), {}), type("CutlassExperts", (), {})
    sites = [site(0, triton), site(1, cutlass), site(2, cutlass), site(3, triton, expert_map=torch.arange(128))]
    logger = logging.getLogger("vllm.sere")  # vLLM's logging may not propagate to the root
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="vllm.sere"):
            resolve_merge_support(sites, required=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert [s.router._sere.merge_tokens for s in sites] == [4, None, None, None]
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records if "merge_slots (auto)" in r.getMessage()))
    assert len(lines) == 2 and "2 layer(s) (1,2)" in lines[0] and "CutlassExperts" in lines[0]
    assert "1 layer(s) (3)" in lines[1] and "expert map" in lines[1]


def test_merge_slots_unset_merges_only_where_the_kernel_merges_in_its_own_launch():
    from sere.vllm.router import _merge_by_default

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    auto = SereConfig(select_top_k=1, threshold=0.0)
    assert _merge_by_default(auto, cuda, "numba", recording=False, global_primary=False)
    assert not _merge_by_default(auto, cpu, "torch", recording=False, global_primary=False)
    assert not _merge_by_default(auto, cuda, "torch", recording=False, global_primary=False)  # a torch merge: slower
    assert not _merge_by_default(auto, cuda, "numba", recording=True, global_primary=False)
    assert not _merge_by_default(auto, cuda, "numba", recording=False, global_primary=True)
    fused = SereConfig(select_top_k=1, threshold=0.0, fuse_topk=True)  # its kernel merges too
    assert _merge_by_default(fused, cuda, "numba", recording=False, global_primary=False)


def test_the_merging_kernels_geometry_follows_the_calls_secondary_slots():
    """Half-warp groups only where the call's secondary slots T (k - S) outnumber the 32-lane
    groups, and only while the row fits; monotone in T, so a warm-up at a layer's smallest and
    largest merged call compiles every kernel it uses."""
    from sere.kernels.numba_launch import MERGE_THREADS, MERGE_THREADS_WIDE_ROWS, merge_geometry

    assert [merge_geometry(128, 8, T)[1] for T in (1, 2, 3, 4)] == [32, 32, 16, 16]  # Qwen3: 7 / 14 / 21 / 28 slots
    assert [merge_geometry(128, 8, T, select_top_k=2)[1] for T in (2, 3)] == [32, 16]  # S = 2: 12 / 18 slots
    assert merge_geometry(128, 8, 4, select_top_k=8) == (MERGE_THREADS, 32)  # identity: no secondary slot
    assert merge_geometry(60, 4, 3) == (MERGE_THREADS, 32)  # Qwen1.5: 3 x 3
    assert merge_geometry(64, 6, 2) == (MERGE_THREADS, 32)  # DeepSeek-V2-Lite: 2 x 5
    assert merge_geometry(256, 8, 8) == (MERGE_THREADS, 32)  # 56 slots, but 16 columns per half-warp lane
    assert merge_geometry(1024, 8, 32) == (MERGE_THREADS_WIDE_ROWS, 32)
    assert merge_geometry(8, 1, 2) == (MERGE_THREADS, 32)
    with pytest.raises(ValueError, match="at most"):
        merge_geometry(4096, 8, 1)


# ---------------------------------------------------------------------------- vLLM's kernel, on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("E,k", [(60, 4), (64, 6), (128, 8)])  # Qwen1.5, DeepSeek-V2-Lite, Qwen3 routing shapes
def test_vllms_small_batch_path_gives_the_same_output_for_merged_slots(E, k):
    """What merge_slots relies on: vLLM's Triton fused_experts on its small-batch path (T k 4 <= E)
    answers id -1 with zeros, so the merged routing gives the unmerged output up to bf16 rounding,
    at every T the plugin merges (sere.vllm.router.merge_tokens)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    fused_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe", reason="needs vLLM's CUDA build")
    H, inter = 256, 128
    gen = torch.Generator(device="cuda").manual_seed(E)
    w13 = torch.randn(E, 2 * inter, H, device="cuda", generator=gen).bfloat16() / H ** 0.5
    w2 = torch.randn(E, H, inter, device="cuda", generator=gen).bfloat16() / inter ** 0.5
    sim = torch.rand(E, E, device="cuda", generator=gen)
    for T in range(1, E // (4 * k) + 1):
        h = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
        weights, ids = torch.rand(T, E, device="cuda", generator=gen).softmax(-1).topk(k, dim=-1)
        ids = reroute(ids.to(torch.int32), sim, 1, 0.0)  # S = 1, rho = 0: slots pile onto few experts
        m_ids, m_w = merge_duplicate_slots(ids, weights, E)
        assert bool((m_ids == -1).any())
        plain = fused_moe.fused_experts(h, w13, w2, weights, ids, global_num_experts=E).float()
        merged = fused_moe.fused_experts(h, w13, w2, m_w, m_ids, global_num_experts=E).float()
        torch.testing.assert_close(merged, plain, rtol=2e-2, atol=2e-3)


def test_the_log_line_says_which_calls_merge():
    from types import SimpleNamespace

    from sere.vllm.router import _merge_note

    def site(limit):
        return SimpleNamespace(router=SimpleNamespace(_sere=SimpleNamespace(merge_tokens=limit)))

    assert _merge_note([site(None), site(None)]) == "off"
    assert _merge_note([site(3), site(3)]) == "T <= 3"
    assert _merge_note([site(4), site(None), site(2)]) == "T <= 2/4"


def test_the_warm_up_before_graph_capture_runs_the_merging_path(monkeypatch):
    """On CUDA the plugin calls each layer once before vLLM captures graphs, so that no kernel is
    compiled during a capture: with merge_slots that call includes route_merged, at the layer's
    smallest and largest merged call (merge_geometry may give them different kernels)."""
    from types import SimpleNamespace

    from sere.vllm.router import MoESite, _warm_up

    for merge_tokens, shapes in ((1, [(1, 4)]), (3, [(1, 4), (3, 4)])):
        layer = rerouter(torch.full((16, 16), 0.5), 1, merge_tokens=merge_tokens)
        calls = []
        monkeypatch.setattr(layer, "route_merged", lambda ids, w: calls.append((tuple(ids.shape), w.dtype)))  # noqa: B023
        site = MoESite("model.layers.0.mlp.experts", 0, None, SimpleNamespace(_sere=layer, _sere_fused=None), 16, 4)
        _warm_up(site)
        assert calls == [(shape, torch.float32) for shape in shapes]
