"""tight_grid (sere.vllm.expert_grid): the bound SERE promises on the experts of a re-routed batch,
the cut of vLLM's aligned lists to it, and the router's note, checked on the CPU against a plain
model of vLLM's align (each expert's slots padded to whole BLOCK_SIZE_M blocks)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sere.config import LayerPlan, SereConfig
from sere.kernels.reference import reroute_reference
from sere.rerouter import LayerRerouter
from sere.transforms import get_transform
from sere.vllm import expert_grid
from sere.vllm.router import _tight_grid_on, sere_class


@pytest.fixture(autouse=True)
def no_leftover_note():
    expert_grid._note = None
    yield
    expert_grid._note = None


def aligned_rows(ids: np.ndarray, block_m: int) -> int:
    """vLLM's num_tokens_post_padded: every expert's slots padded to whole blocks (invalid ids,
    at worst, as one more bucket)."""
    _, counts = np.unique(np.where(ids < 0, -1, ids), return_counts=True)
    return int(sum(-(-c // block_m) * block_m for c in counts))


def vllm_assignment(num_slots: int, num_experts: int, block_m: int):
    """Buffers as long as vLLM allocates them (any ids: numel + E * (BM - 1) rows)."""
    rows = num_slots + num_experts * (block_m - 1)
    return torch.arange(rows, dtype=torch.int32), torch.zeros(-(-rows // block_m), dtype=torch.int32), torch.tensor([0])


@pytest.mark.parametrize("seed", range(40))
def test_after_sere_the_aligned_list_fits_the_bound(seed):
    # Whatever the routing, with rho <= every similarity the re-routed ids fill at most
    # numel + min(E, T S) (BM - 1) rows: the cut never drops a block the kernel needs.
    rng = np.random.default_rng(seed)
    E, k = int(rng.integers(4, 130)), int(rng.integers(2, 9))
    k = min(k, E)
    T, S, block_m = int(rng.integers(1, 80)), int(rng.integers(1, k)), int(rng.choice([16, 32, 64]))
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)])
    if seed % 4 == 0:
        ids[rng.random(ids.shape) < 0.2] = -1  # invalid ids pass through SERE
    sim = rng.uniform(0.05, 1.0, size=(E, E)).astype(np.float32)
    rho = float(rng.choice([0.0, sim.min()]))
    assert expert_grid.bound_floor(torch.from_numpy(sim), rho) is not None
    new = reroute_reference(ids, sim, S, rho)
    bound = expert_grid.max_experts_after_sere(T, E, S)
    assert len(np.unique(new[new >= 0])) <= bound
    sorted_ids, expert_ids, post = expert_grid.trim_assignment(vllm_assignment(T * k, E, block_m), T * k, block_m, bound)
    need = aligned_rows(new, block_m)  # the rows and blocks the kernel reads
    assert need <= sorted_ids.shape[0] and need // block_m <= expert_ids.shape[0]


def test_a_threshold_above_some_similarity_gives_no_bound():
    # rho above a similarity can keep a slot outside P: more than T S experts, so no promise.
    sim = np.array([[1.0, 0.1], [0.1, 1.0]], np.float32)
    new = reroute_reference(np.array([[0, 1]]), sim, 1, 0.5)  # T = 1, S = 1: P = {0}, slot 1 stays
    assert len(np.unique(new)) == 2 > expert_grid.max_experts_after_sere(1, 2, 1)
    assert expert_grid.bound_floor(torch.from_numpy(sim), 0.5) is None
    assert expert_grid.bound_floor(torch.from_numpy(sim), 0.1) == pytest.approx(0.1)
    assert expert_grid.max_experts_after_sere(3, 2, 1) == 2  # never above E


def test_trim_cuts_views_of_the_same_buffers_in_whole_blocks():
    sorted_ids, expert_ids, post = vllm_assignment(128, 128, 16)  # T = 16, k = 8: 2048 rows, 128 blocks
    cut = expert_grid.trim_assignment((sorted_ids, expert_ids, post), 128, 16, 16)
    assert cut[0].shape[0] == 384 and cut[1].shape[0] == 24 and cut[2] is post  # 128 + 17 * 15 rows, whole blocks
    assert cut[0].data_ptr() == sorted_ids.data_ptr() and cut[1].data_ptr() == expert_ids.data_ptr()
    odd = expert_grid.trim_assignment((sorted_ids, expert_ids, post), 100, 16, 3)  # 160 rows: 10 blocks
    assert odd[0].shape[0] == 160 and odd[1].shape[0] == 10
    whole = (sorted_ids, expert_ids, post)
    assert expert_grid.trim_assignment(whole, 128, 16, 128) is whole  # no shorter than it is
    small = (None, torch.arange(8), torch.tensor([128]))  # vLLM's small-batch path: no list to cut
    assert expert_grid.trim_assignment(small, 8, 16, 1) is small


def test_a_note_matches_only_its_own_live_tensor_once():
    ids = torch.zeros(16, 8, dtype=torch.int32)
    expert_grid.note_bound(ids, 16)
    assert expert_grid.take_bound(ids[:8]) is None  # same memory, another shape: not the noted ids
    expert_grid.note_bound(ids, 16)
    assert expert_grid.take_bound(ids.clone()) is None
    expert_grid.note_bound(ids, 16)
    assert expert_grid.take_bound(ids) == 16
    assert expert_grid.take_bound(ids) is None  # taken once
    other = torch.zeros(4, 8, dtype=torch.int32)
    expert_grid.note_bound(other, 4)
    del other  # freed: its memory may hold another tensor now
    assert expert_grid.take_bound(torch.zeros(4, 8, dtype=torch.int32)) is None


def test_the_wrapper_cuts_noted_calls_only():
    calls = []

    def original(topk_ids, config, *args, **kwargs):
        calls.append((args, kwargs))
        return vllm_assignment(topk_ids.numel(), 128, config["BLOCK_SIZE_M"])

    wrapped = expert_grid.bounded(original)
    ids = torch.zeros(16, 8, dtype=torch.int32)
    before = expert_grid.trimmed_calls
    full = wrapped(ids, {"BLOCK_SIZE_M": 16}, 16, 8, 128, None, ignore_invalid_experts=False)
    assert full[0].shape[0] == 2048 and expert_grid.trimmed_calls == before
    expert_grid.note_bound(ids, 16)
    cut = wrapped(ids, {"BLOCK_SIZE_M": 16}, 16, 8, 128, None, ignore_invalid_experts=False)
    assert cut[0].shape[0] == 384 and expert_grid.trimmed_calls == before + 1
    assert calls[-1] == ((16, 8, 128, None), {"ignore_invalid_experts": False})  # arguments passed through
    assert wrapped.__wrapped__ is original and expert_grid.bounded(original)._sere_bounded


class FakeRouter:
    """A FusedMoERouter stand-in: select_experts returns fixed (weights, ids)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def select_experts(self, **kwargs):
        return torch.ones(self.ids.shape), self.ids


def rerouted_router(ids: torch.Tensor, S: int, grid: bool, max_tokens=None) -> FakeRouter:
    E = 32
    sim = torch.rand(E, E, generator=torch.Generator().manual_seed(0))
    router = FakeRouter(ids)
    router.__class__ = sere_class(FakeRouter)
    router._sere = LayerRerouter(LayerPlan(0, S, 0.0, max_tokens), sim, get_transform("sere", backend="torch"),
                                 sort_slots=False, backend="torch")
    router._sere_fused = None
    router._sere_grid = float(sim.min()) if grid else None
    return router


def test_the_router_notes_the_bound_on_re_routed_ids_only():
    ids = torch.randint(0, 32, (6, 4), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    _, new = rerouted_router(ids, 1, grid=True).select_experts()
    assert expert_grid.take_bound(new) == 6  # min(E, T S) = min(32, 6)
    _, same = rerouted_router(ids, 4, grid=True).select_experts()  # S >= k: the ids themselves, no promise
    assert same is ids and expert_grid._note is None
    _, skipped = rerouted_router(ids, 1, grid=True, max_tokens=2).select_experts()  # past max_tokens: untouched
    assert skipped is ids and expert_grid._note is None
    _, off = rerouted_router(ids, 1, grid=False).select_experts()
    assert off is not ids and expert_grid._note is None
    raised = rerouted_router(ids, 1, grid=True)
    raised._sere.threshold = 2.0  # a hook raised rho above every similarity: slots may stay out of P
    raised.select_experts()
    assert expert_grid._note is None


def test_the_plugin_says_where_tight_grid_cannot_be_on(caplog):
    assert _tight_grid_on(SereConfig(threshold=0.0), None, torch.device("cuda")) is False  # not asked
    with caplog.at_level(logging.WARNING, logger="vllm.sere"):
        assert _tight_grid_on(SereConfig(threshold=0.0, tight_grid=True), None, torch.device("cpu")) is False
        assert _tight_grid_on(SereConfig(threshold=0.0, tight_grid=True, method="random"), None,
                              torch.device("cuda")) is False
    assert "on cpu" in caplog.text and "method 'random'" in caplog.text


def test_tight_grid_is_a_bool_setting():
    assert SereConfig.from_dict({"tight_grid": True}).tight_grid is True
    assert SereConfig().tight_grid is False
    with pytest.raises(TypeError, match="tight_grid must be true or false"):
        SereConfig.from_dict({"tight_grid": "yes"})


def test_install_without_vllm_says_so(monkeypatch):
    monkeypatch.setattr(expert_grid, "PATCHED_MODULES", ("sere_no_such_module.fused_moe",))
    with pytest.raises(RuntimeError, match="run without tight_grid"):
        expert_grid.install()
