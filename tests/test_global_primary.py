"""A global primary set under data-parallel attention (primary_set="global"; issue 15, "Data parallel + EP").

    pytest tests/test_global_primary.py
    .venv-vllm/bin/python -m pytest tests/test_global_primary.py     # + the vLLM wiring

The contract with a given primary mask (reference and torch), the collective that makes the
mask the union over a group (two processes over gloo on 127.0.0.1), the config option, the
re-router with a stand-in group, and the fused top-k's refusal. CPU only; two-GPU runs pending.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch

from sere.config import LayerPlan, SereConfig
from sere.kernels.reference import primary_mask_reference, reroute_reference, reroute_with_primary_reference
from sere.recorder import ExpertStatsRecorder
from sere.rerouter import LayerRerouter, StatsObserver
from sere.routing import all_reduce_sum, global_primary_mask, local_primary_counts, reroute, reroute_with_primary
from sere.stats import reroute_stats
from sere.transforms import get_transform
from tests.helpers import random_similarity, random_topk_ids

E, K, S, RHO = 60, 6, 2, 0.3
# (T, E, k, S, rho): odd sizes, identity settings, rho that keeps experts and rho that keeps none.
CASES = ((1, 8, 2, 1, 0.0), (33, 60, 6, 2, 0.3), (33, 60, 6, 2, 0.7), (256, 128, 8, 1, 0.0), (7, 8, 4, 0, 0.0),
         (7, 8, 4, 4, 0.0), (0, 8, 4, 1, 0.0))


def weights_for(T: int, k: int, seed: int) -> torch.Tensor:
    """[T, k] distinct weights in a random slot order (a router that does not sort)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(T, k, generator=gen) + torch.arange(k) * 1e-3  # T, k


def in_weight_order(ids: np.ndarray, weights: np.ndarray, fn) -> np.ndarray:
    """fn applied to the ids in each token's descending-weight order, written back to their slots."""
    order = np.argsort(-weights, axis=1, kind="stable")  # T, k
    new_sorted = fn(np.take_along_axis(ids, order, axis=1))
    out = np.empty_like(ids)
    np.put_along_axis(out, order, new_sorted, axis=1)
    return out


def sorted_ids(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.take_along_axis(ids, np.argsort(-weights, axis=1, kind="stable"), axis=1)


# ---------------------------------------------------------------------------- the contract with a given P

@pytest.mark.parametrize("T, e, k, s, rho", CASES)
def test_with_the_batchs_own_primary_set_it_is_reroute_bit_for_bit(T, e, k, s, rho):
    rng = np.random.default_rng([T, e, k, s, int(rho * 10)])
    ids = random_topk_ids(rng, T, e, k, invalid_frac=0.1)
    sim = random_similarity(rng, e, ties=T % 2 == 1)
    own = primary_mask_reference(ids.numpy(), e, s)
    want = reroute_reference(ids.numpy(), sim.numpy(), s, rho)
    assert np.array_equal(reroute_with_primary_reference(ids.numpy(), sim.numpy(), s, rho, own), want)
    got = reroute_with_primary(ids, sim, s, rho, torch.from_numpy(own), backend="torch")
    assert got.dtype == ids.dtype and np.array_equal(got.numpy(), want)
    assert torch.equal(got, reroute(ids, sim, s, rho, backend="torch"))


@pytest.mark.parametrize("T, e, k, s, rho", CASES)
def test_torch_matches_the_reference_for_any_given_primary_set(T, e, k, s, rho):
    rng = np.random.default_rng([7, T, e, k, s])
    ids = random_topk_ids(rng, T, e, k, invalid_frac=0.1, dtype=torch.int32)
    sim = random_similarity(rng, e, ties=True)
    for given in (rng.random(e) < 0.3, np.zeros(e, bool), np.ones(e, bool)):
        want = reroute_with_primary_reference(ids.numpy(), sim.numpy(), s, rho, given)
        for mask in (torch.from_numpy(given), torch.from_numpy(given.astype(np.int32) * 3)):  # bool or nonzero ints
            got = reroute_with_primary(ids, sim, s, rho, mask, backend="torch")
            assert got.dtype == torch.int32 and np.array_equal(got.numpy(), want)
        assert np.array_equal(reroute_with_primary(ids, sim, s, rho, torch.from_numpy(given), backend="reference").numpy(), want)


def test_a_given_primary_set_by_hand():
    # rank's batch: P_local = {0}; the given P adds 3 (another rank's top-1).
    ids = np.array([[0, 3, 5, 6], [0, 1, 3, -1]])
    sim = np.full((8, 8), 0.1, np.float32)
    sim[5, 3], sim[5, 0] = 0.9, 0.5  # 5: best in {0, 3} is 3, best in {0} is 0
    sim[1, 0] = 0.4  # 1: goes to 0 (0.4 >= rho); 6: best 0.1 < rho, kept (critical)
    sim[3, 0] = 0.6  # 3: moves to 0 where 0 is the only primary expert
    given = np.zeros(8, bool)
    given[[0, 3]] = True
    got = reroute_with_primary_reference(ids, sim, 1, 0.3, given)
    assert got.tolist() == [[0, 3, 3, 6], [0, 0, 3, -1]]  # 3 stays (primary), 5 -> 3, 6 critical, -1 passes
    assert reroute_reference(ids, sim, 1, 0.3).tolist() == [[0, 0, 0, 6], [0, 0, 0, -1]]  # locally 3 and 5 move to 0
    assert torch.equal(reroute_with_primary(torch.from_numpy(ids), torch.from_numpy(sim), 1, 0.3,
                                            torch.from_numpy(given)), torch.from_numpy(got))


def test_bad_primary_masks_are_refused_with_the_reason():
    ids, sim = torch.zeros(2, 4, dtype=torch.int64), torch.rand(8, 8)
    with pytest.raises(ValueError, match=r"primary_mask must be \[E\] = \[8\]"):
        reroute_with_primary(ids, sim, 1, 0.0, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        reroute_with_primary(ids, sim, 1, 0.0, torch.zeros(8))
    with pytest.raises(ValueError, match="numba kernels build the primary set"):
        reroute_with_primary(ids, sim, 1, 0.0, torch.zeros(8, dtype=torch.bool), backend="numba")


def test_the_local_mask_takes_valid_ids_of_slots_below_s_only():
    ids = torch.tensor([[2, 5, 1], [-1, 7, 3], [9, 4, 0]])  # E = 8: -1 and 9 invalid
    counts = local_primary_counts(ids, 8, 2)
    assert counts.dtype == torch.float32 and counts.tolist() == [0, 0, 1, 0, 1, 1, 0, 1]
    assert local_primary_counts(ids[:0], 8, 2).tolist() == [0] * 8  # T = 0: an all-zero share


# ---------------------------------------------------------------------------- two ranks over gloo

ROUTED = {"different": (33, 17), "same": (21, 21), "empty": (9, 0), "over_max_tokens": (40, 5)}  # T per rank
DP_RHO = 0.9  # high enough that the union of ~46 primary experts leaves critical ones
SEEDS = {"different": 1, "same": 2, "empty": 3, "over_max_tokens": 4}
MAX_TOKENS = 32


def scenario(name: str, rank: int):
    """(ids, weights, sim) of `rank` in scenario `name`; the same on every process."""
    T = ROUTED[name][rank]
    seed = [SEEDS[name], 0 if name == "same" else rank]
    ids = random_topk_ids(np.random.default_rng(seed), T, E, K, invalid_frac=0.05)
    sim = random_similarity(np.random.default_rng(99), E)
    return ids, weights_for(T, K, seed[0] * 10 + seed[1]), sim


class Coordinator:
    """vLLM's GroupCoordinator as sere.routing.all_reduce_sum uses it: an out-of-place all_reduce (here over gloo)."""

    def __init__(self):
        self.calls = 0

    def all_reduce(self, t):
        self.calls += 1
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One DP rank: every scenario, results to out_dir/rank{rank}.pt (a traceback to .err)."""
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        world = dist.group.WORLD
        out = {}
        for name in ROUTED:
            ids, weights, sim = scenario(name, rank)
            mask = global_primary_mask(ids, E, S, world)
            new = reroute_with_primary(ids, sim, S, DP_RHO, mask, backend="torch")
            max_tokens = MAX_TOKENS if name == "over_max_tokens" else None
            layer = LayerRerouter(LayerPlan(3, S, DP_RHO, max_tokens, "global"), sim, get_transform("sere"),
                                  sort_slots=True, backend="torch", primary_group=world)
            coordinator = Coordinator()
            via_coordinator = LayerRerouter(LayerPlan(3, S, DP_RHO, max_tokens, "global"), sim, get_transform("sere"),
                                            sort_slots=True, backend="torch", primary_group=coordinator)
            out[name] = {"mask": mask, "new": new, "layer": layer(ids, weights),
                         "coordinator": via_coordinator(ids, weights), "coordinator_calls": coordinator.calls}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """{scenario: [rank 0's results, rank 1's]} from two processes of one gloo group."""
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("dp"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, out_dir)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
    assert not hung and not errors, f"rank(s) hung or failed: {[p.pid for p in hung]} {''.join(errors)}"
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in (0, 1)]
    return {name: [ranks[0][name], ranks[1][name]] for name in ROUTED}


def _union(name):
    """The union of both ranks' top-S experts (by weight: the re-router's contract order) and the
    ids in that order, per rank."""
    per_rank = [scenario(name, r) for r in (0, 1)]
    ordered = [sorted_ids(ids.numpy(), w.numpy()) for ids, w, _ in per_rank]
    union = np.zeros(E, bool)
    for o in ordered:
        union |= primary_mask_reference(o, E, S)
    return union, per_rank


def test_two_ranks_get_the_union_of_their_primary_sets_and_reroute_against_it(two_ranks):
    got = two_ranks["different"]
    per_rank = [scenario("different", r) for r in (0, 1)]
    slot_union = primary_mask_reference(per_rank[0][0].numpy(), E, S) | primary_mask_reference(per_rank[1][0].numpy(), E, S)
    assert got[0]["mask"].tolist() == got[1]["mask"].tolist() == slot_union.tolist()
    differs = False
    for r, (ids, _, sim) in enumerate(per_rank):
        local = primary_mask_reference(ids.numpy(), E, S)
        assert (slot_union & ~local).any(), f"rank {r}: the other rank adds no primary expert: the case tests nothing"
        want = reroute_with_primary_reference(ids.numpy(), sim.numpy(), S, DP_RHO, slot_union)
        assert np.array_equal(got[r]["new"].numpy(), want)
        differs |= not np.array_equal(want, reroute_reference(ids.numpy(), sim.numpy(), S, DP_RHO))
        kept = (ids[:, S:] >= 0) & (ids[:, S:] < E) & ~torch.from_numpy(slot_union)[ids[:, S:].clamp(0, E - 1)]
        kept &= got[r]["new"][:, S:] == ids[:, S:]
        assert bool(kept.any()), f"rank {r}: no critical expert kept at rho={DP_RHO}: the case tests nothing"
    assert differs, "global and local P give the same ids on both ranks: the case tests nothing"


def test_the_rerouter_over_a_process_group_or_a_coordinator_matches_the_reference(two_ranks):
    union, per_rank = _union("different")
    for r, (ids, w, sim) in enumerate(per_rank):
        want = in_weight_order(ids.numpy(), w.numpy(),
                               lambda o: reroute_with_primary_reference(o, sim.numpy(), S, DP_RHO, union))
        assert np.array_equal(two_ranks["different"][r]["layer"].numpy(), want)
        assert np.array_equal(two_ranks["different"][r]["coordinator"].numpy(), want)
        assert two_ranks["different"][r]["coordinator_calls"] == 1


def test_identical_batches_give_the_local_primary_set_and_the_local_ids(two_ranks):
    ids, w, sim = scenario("same", 0)
    assert torch.equal(ids, scenario("same", 1)[0])
    for r in (0, 1):
        got = two_ranks["same"][r]
        assert got["mask"].tolist() == primary_mask_reference(ids.numpy(), E, S).tolist()
        assert np.array_equal(got["new"].numpy(), reroute_reference(ids.numpy(), sim.numpy(), S, DP_RHO))
        assert not torch.equal(got["new"], ids), "nothing re-routed: the case tests nothing"


def test_a_rank_with_no_tokens_joins_the_collective_and_takes_the_others_set(two_ranks):
    ids0, _, sim = scenario("empty", 0)
    assert scenario("empty", 1)[0].shape == (0, K)
    local0 = primary_mask_reference(ids0.numpy(), E, S)
    got = two_ranks["empty"]
    assert got[0]["mask"].tolist() == got[1]["mask"].tolist() == local0.tolist()
    assert got[1]["new"].shape == got[1]["layer"].shape == (0, K)
    assert np.array_equal(got[0]["new"].numpy(), reroute_reference(ids0.numpy(), sim.numpy(), S, DP_RHO))
    assert got[1]["coordinator_calls"] == 1, "the empty rank did not join the all-reduce"


def test_a_call_over_max_tokens_is_left_alone_but_still_adds_its_share(two_ranks):
    union, per_rank = _union("over_max_tokens")
    (ids0, _, _), (ids1, w1, sim) = per_rank
    assert ids0.shape[0] > MAX_TOKENS >= ids1.shape[0]
    got = two_ranks["over_max_tokens"]
    assert torch.equal(got[0]["layer"], ids0) and torch.equal(got[0]["coordinator"], ids0)
    assert got[0]["coordinator_calls"] == got[1]["coordinator_calls"] == 1
    local1 = primary_mask_reference(sorted_ids(ids1.numpy(), w1.numpy()), E, S)
    assert (union & ~local1).any(), "rank 0 adds nothing: the case tests nothing"
    want = in_weight_order(ids1.numpy(), w1.numpy(), lambda o: reroute_with_primary_reference(o, sim.numpy(), S, DP_RHO, union))
    assert np.array_equal(got[1]["layer"].numpy(), want)


# ---------------------------------------------------------------------------- the config option

def test_primary_set_defaults_to_local_and_reaches_the_plan():
    assert SereConfig().primary_set == "local"
    config = SereConfig.from_dict({"select_top_k": 1, "threshold": 0.1, "primary_set": "global"})
    assert config.primary_set == "global" and config != SereConfig(select_top_k=1, threshold=0.1)
    assert {p.primary_set for p in config.plan([0, 3]).values()} == {"global"}
    assert {p.primary_set for p in SereConfig().plan([0, 3]).values()} == {"local"}


@pytest.mark.parametrize("bad", ["Global", "union", "", None, 1, True])
def test_a_bad_primary_set_is_one_line_naming_the_choices(bad):
    with pytest.raises(ValueError) as e:
        SereConfig(primary_set=bad)
    assert str(e.value) == f"primary_set must be one of 'local', 'global', got {bad!r}"


def test_a_global_primary_set_needs_the_sere_method():
    with pytest.raises(ValueError, match="primary_set 'global' is SERE's primary set; it needs method 'sere', got 'random'"):
        SereConfig(primary_set="global", method="random")


# ---------------------------------------------------------------------------- the re-router, one process

class StubGroup:
    """This rank's view of a DP group of two: all_reduce adds the other rank's [E] share
    (out of place, as vLLM's GroupCoordinator) and keeps what it was handed."""

    def __init__(self, other: torch.Tensor):
        self.other = other.to(torch.float32)
        self.handed: list[torch.Tensor] = []

    def all_reduce(self, t):
        self.handed.append(t.clone())
        return t + self.other


def rerouter(sim, group=None, *, s=S, rho=RHO, max_tokens=None, sort_slots=True, observers=None, backend="torch"):
    plan = LayerPlan(3, s, rho, max_tokens, "local" if group is None else "global")
    return LayerRerouter(plan, sim, get_transform("sere", backend=backend), sort_slots=sort_slots, backend=backend,
                         observers=observers, primary_group=group)


@pytest.mark.parametrize("sort_slots", [True, False])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_rerouter_with_a_stub_group_reroutes_against_the_union(sort_slots, backend):
    rng = np.random.default_rng(5)
    ids, sim = random_topk_ids(rng, 33, E, K, invalid_frac=0.05), random_similarity(rng, E)
    w = weights_for(33, K, 5) if sort_slots else torch.linspace(1, 0, K).expand(33, K).contiguous()
    other = torch.zeros(E)
    other[rng.choice(E, 6, replace=False)] = 1
    group = StubGroup(other)
    got = rerouter(sim, group, sort_slots=sort_slots, backend=backend)(ids, w)
    ordered = sorted_ids(ids.numpy(), w.numpy())
    local = primary_mask_reference(ordered, E, S)
    union = local | (other.numpy() > 0)
    want = in_weight_order(ids.numpy(), w.numpy(), lambda o: reroute_with_primary_reference(o, sim.numpy(), S, RHO, union))
    assert np.array_equal(got.numpy(), want)
    assert len(group.handed) == 1 and group.handed[0].tolist() == local.astype(np.float32).tolist()
    assert not np.array_equal(want, in_weight_order(ids.numpy(), w.numpy(), lambda o: reroute_reference(o, sim.numpy(), S, RHO)))


def test_a_group_of_one_is_the_local_rerouter_bit_for_bit():
    rng = np.random.default_rng(6)
    sim = random_similarity(rng, E)
    for T in (0, 1, 33):
        ids, w = random_topk_ids(rng, T, E, K, invalid_frac=0.05), weights_for(T, K, T)
        alone = StubGroup(torch.zeros(E))  # a DP group of one rank: the sum is this rank's share
        got = rerouter(sim, alone)(ids, w)
        assert torch.equal(got, rerouter(sim)(ids, w)) and got.dtype == ids.dtype
        assert len(alone.handed) == 1


def test_identity_settings_skip_the_collective_and_max_tokens_does_not():
    rng = np.random.default_rng(8)
    ids, w, sim = random_topk_ids(rng, 9, E, K), weights_for(9, K, 8), random_similarity(rng, E)
    for s in (0, K):  # S <= 0, S >= k: the same on every rank, so no rank calls it
        group = StubGroup(torch.ones(E))
        assert rerouter(sim, group, s=s)(ids, w) is ids and group.handed == []
    group = StubGroup(torch.ones(E))
    assert rerouter(sim, group, max_tokens=8)(ids, w) is ids  # left alone, but its share goes in
    top = sorted_ids(ids.numpy(), w.numpy())
    assert len(group.handed) == 1 and group.handed[0].tolist() == primary_mask_reference(top, E, S).astype(np.float32).tolist()


@pytest.mark.slow
def test_the_global_rerouter_compiles_in_one_graph_for_every_batch_size():
    """Dynamo (vLLM traces the router on the CPU): fullgraph, dynamic shapes, the max_tokens
    select included; the same ids as eager. About 10 s of compiling."""
    rng = np.random.default_rng(10)
    sim = random_similarity(rng, E)
    other = torch.zeros(E)
    other[::7] = 1
    layer = rerouter(sim, StubGroup(other), max_tokens=16)
    compiled = torch.compile(lambda ids, w: layer(ids, w), fullgraph=True, dynamic=True)
    for T in (3, 33):  # under and over max_tokens
        ids, w = random_topk_ids(rng, T, E, K, invalid_frac=0.05), weights_for(T, K, T)
        eager = layer(ids, w)
        assert torch.equal(compiled(ids, w), eager)
        assert torch.equal(eager, ids) == (T > 16)


def test_a_global_plan_needs_a_group_and_a_local_plan_takes_none():
    sim = torch.rand(8, 8)
    with pytest.raises(ValueError, match="primary_set 'global' needs the data-parallel group"):
        LayerRerouter(LayerPlan(0, 1, 0.0, None, "global"), sim, get_transform("sere"), sort_slots=False)
    with pytest.raises(ValueError, match="plan's primary_set is 'local'"):
        LayerRerouter(LayerPlan(0, 1, 0.0, None), sim, get_transform("sere"), sort_slots=False,
                      primary_group=StubGroup(torch.zeros(8)))


def test_statistics_count_critical_slots_against_the_global_set():
    rng = np.random.default_rng(9)
    ids, sim = random_topk_ids(rng, 33, E, K), random_similarity(rng, E)
    w = torch.linspace(1, 0, K).expand(33, K).contiguous()
    other = torch.zeros(E)
    other[:20] = 1
    recorder = ExpertStatsRecorder()
    new = rerouter(sim, StubGroup(other), rho=0.9, sort_slots=False, observers=[StatsObserver(recorder)])(ids, w)
    union = torch.from_numpy(primary_mask_reference(ids.numpy(), E, S)) | (other > 0)
    sec = ids[:, S:]
    want = int(((~union[sec]) & (new[:, S:] == sec)).sum())
    row = recorder.per_layer()[3]
    assert row["critical"] == [want] and int(reroute_stats(ids, new, E, S, primary=union).critical) == want
    assert want > 0, "no critical slot: the case tests nothing"
    assert int(reroute_stats(ids, new, E, S).critical) != want, "the batch's own P counts the same: the case tests nothing"
    assert row["experts_after"][0] == len(set(new.flatten().tolist()))


def test_all_reduce_sum_over_a_process_group_of_one():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        t = torch.tensor([0.0, 1.0, 1.0])
        assert all_reduce_sum(t, None) is t and t.tolist() == [0.0, 1.0, 1.0]
        ids = torch.tensor([[1, 2], [-1, 0]])
        assert global_primary_mask(ids, 3, 1, dist.group.WORLD).tolist() == [False, True, False]
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- vLLM: fused top-k, DP group

def test_the_fused_top_k_refuses_a_global_primary_set():
    from sere.vllm.fused_topk import why_not

    class FusedTopKRouter:  # vLLM's plain router as why_not sees it (tests/test_vllm_fused_topk.py)
        top_k, global_num_experts, renormalize, scoring_func, eplb_state = K, E, True, "softmax", None

        def _compute_routing(self, *args, **kwargs):
            raise AssertionError("not called")

    sim = torch.rand(E, E)
    assert why_not(FusedTopKRouter(), rerouter(sim, sort_slots=False), "numba", "sere") is None
    reason = why_not(FusedTopKRouter(), rerouter(sim, StubGroup(torch.zeros(E)), sort_slots=False), "numba", "sere")
    assert reason is not None and reason.startswith("primary_set global")
