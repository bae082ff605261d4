"""The expert-parallel simulation (bench/ep_model.py, ep_routing.py, ep_simulation.py,
ep_report.py): hand-made cases with known answers, the properties that must hold for any
routing, and an end-to-end run on tiny settings. CPU only, a few seconds."""
from __future__ import annotations

import json

import pytest
import torch

from bench.ep_model import MODELS, layer_metrics, sere_ids, sere_ids_direct
from bench.ep_report import Assumptions, verdicts
from bench.ep_routing import doubled_similarity, grouped_ids, routing_source, split_ids, trace_rows
from bench.ep_simulation import TINY, Sweep, cell_rows, main

# E = 8, D = 2: rank 0 owns experts 0-3, rank 1 owns 4-7. One token per rank, k = 3.
HAND_IDS = torch.tensor([[[0, 5, 6]], [[6, 1, 7]]])  # D, B, k


def hand_similarity() -> torch.Tensor:
    sim = torch.full((8, 8), 0.1)
    sim.fill_diagonal_(1.0)
    for (moved, target), value in {(5, 0): 0.9, (5, 6): 0.2, (1, 6): 0.8, (1, 0): 0.3,
                                   (7, 0): 0.7, (7, 6): 0.4}.items():
        sim[moved, target] = value
    return sim


def test_hand_case_stock():
    m = layer_metrics(HAND_IDS, 8)
    assert m.experts_per_rank == [2, 3]  # rank 0: {0, 1}; rank 1: {5, 6, 7}
    assert m.slowest_rank_experts == 3 and m.total_experts == 5
    # token 0 (rank 0) needs rank 1 once (experts 5 and 6 share it); token 1 (rank 1) needs rank 0 once
    assert (m.copies_per_rank, m.copies_per_expert, m.copies_per_slot) == (2, 3, 3)
    assert m.busiest_rank_copies == 1


BOTH_FORMS = pytest.mark.parametrize("route", [sere_ids, sere_ids_direct], ids=["map", "direct"])


@BOTH_FORMS
def test_hand_case_sere_rho0_per_rank_vs_global(route):
    sim = hand_similarity()
    per_rank = route(HAND_IDS, sim, 1, 0.0, "per_rank")
    glob = route(HAND_IDS, sim, 1, 0.0, "global")
    # per rank: each token's primary set is its own top-1, so everything collapses onto it
    assert per_rank.tolist() == [[[0, 0, 0]], [[6, 6, 6]]]
    # global: P = {0, 6}; 6 stays, 5 -> 0 (0.9 > 0.2), 1 -> 6 (0.8 > 0.3), 7 -> 0 (0.7 > 0.4)
    assert glob.tolist() == [[[0, 0, 6]], [[6, 6, 0]]]
    mp, mg = layer_metrics(per_rank, 8), layer_metrics(glob, 8)
    assert mp.experts_per_rank == mg.experts_per_rank == [1, 1]  # same experts at rho = 0
    assert (mp.copies_per_rank, mp.copies_per_expert, mp.copies_per_slot) == (0, 0, 0)
    assert (mg.copies_per_rank, mg.copies_per_expert, mg.copies_per_slot) == (2, 2, 2)


@BOTH_FORMS
def test_hand_case_rho_keeps_criticals_that_the_global_set_absorbs(route):
    sim = hand_similarity()
    per_rank = route(HAND_IDS, sim, 1, 0.5, "per_rank")
    glob = route(HAND_IDS, sim, 1, 0.5, "global")
    assert per_rank.tolist() == [[[0, 0, 6]], [[6, 6, 7]]]  # 6 (0.1 to 0) and 7 (0.4 to 6) stay critical
    assert glob.tolist() == [[[0, 0, 6]], [[6, 6, 0]]]  # 7 reaches 0 (0.7) in the union
    assert layer_metrics(per_rank, 8).experts_per_rank == [1, 2]
    assert layer_metrics(glob, 8).experts_per_rank == [1, 1]


def test_duplicates_collapse_per_expert_but_not_per_slot():
    # E = 8, D = 2: the token on rank 0 holds expert 4 twice (as SERE leaves it); rank 1's is all local
    ids = torch.tensor([[[4, 4, 5, 0]], [[4, 5, 6, 7]]])  # D, B, k
    m = layer_metrics(ids, 8)
    assert m.copies_per_rank == 1  # token 0 -> rank 1 once
    assert m.copies_per_expert == 2  # experts 4 and 5
    assert m.copies_per_slot == 3  # slots 4, 4, 5
    assert m.busiest_rank_copies == 1


PARITY_CASES = [  # E, D, B, k, S
    (8, 2, 1, 4, 1), (8, 4, 3, 4, 2), (60, 3, 7, 4, 3), (64, 16, 5, 6, 1), (128, 8, 33, 8, 2), (256, 64, 2, 8, 1),
]


@pytest.mark.parametrize("E,D,B,k,S", PARITY_CASES)
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5, 1.0])
def test_map_form_equals_sere_reroute_on_the_tokens(E, D, B, k, S, rho):
    gen = torch.Generator().manual_seed(E * 1000 + D * 10 + S)
    ids = torch.rand(D * B, E, generator=gen).topk(k, dim=-1).indices.view(D, B, k)  # D, B, k
    sim = (torch.rand(E, E, generator=gen) * 4).round() / 4  # many ties and values equal to rho
    sim.fill_diagonal_(1.0)
    for scope in ("per_rank", "global"):
        assert torch.equal(sere_ids(ids, sim, S, rho, scope), sere_ids_direct(ids, sim, S, rho, scope))


RANDOM_CASES = [  # E, D, B, k, S, rho
    (8, 2, 3, 4, 1, 0.0), (60, 4, 5, 4, 2, 0.3), (64, 8, 16, 6, 1, 0.5),
    (128, 16, 1, 8, 2, 0.1), (256, 64, 4, 8, 1, 0.0), (256, 32, 33, 8, 3, 0.6),
]


@pytest.mark.parametrize("E,D,B,k,S,rho", RANDOM_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_properties_on_random_routing(E, D, B, k, S, rho, seed):
    src = routing_source("zipf:1.0", E, k)
    ids, sim = src.draw(D, B, seed)
    stock = layer_metrics(ids, E)
    pr = layer_metrics(sere_ids(ids, sim, S, rho, "per_rank"), E)
    gl = layer_metrics(sere_ids(ids, sim, S, rho, "global"), E)
    # every expert SERE uses was already used (primaries stay, targets are primaries)
    assert all(p <= s for p, s in zip(pr.experts_per_rank, stock.experts_per_rank))
    # the global set's criticals are per-rank criticals too: never more experts, on any rank
    assert all(g <= p for g, p in zip(gl.experts_per_rank, pr.experts_per_rank))
    assert gl.total_experts <= pr.total_experts
    if rho == 0:
        assert gl.experts_per_rank == pr.experts_per_rank
    for m in (stock, pr, gl):
        assert m.copies_per_rank <= m.copies_per_expert <= m.copies_per_slot <= D * B * k
        assert m.busiest_rank_copies <= m.copies_per_rank


def test_one_rank_has_no_all_to_all_and_no_difference_between_scopes():
    ids, sim = routing_source("uniform", 64, 6).draw(1, 16, 0)
    for scope in ("stock", "per_rank", "global"):
        m = layer_metrics(sere_ids(ids, sim, 1, 0.0, scope), 64)
        assert (m.copies_per_rank, m.copies_per_expert, m.copies_per_slot, m.busiest_rank_copies) == (0, 0, 0, 0)
    assert torch.equal(sere_ids(ids, sim, 1, 0.0, "per_rank"), sere_ids(ids, sim, 1, 0.0, "global"))


@pytest.mark.parametrize("S,rho", [(8, 0.0), (0, 0.0), (1, 2.0)])  # S >= k, S <= 0, rho above every similarity
def test_identity_settings_give_stock(S, rho):
    ids, sim = routing_source("uniform", 128, 8).draw(4, 5, 3)
    for scope in ("per_rank", "global"):
        assert torch.equal(sere_ids(ids, sim, S, rho, scope), ids)
        assert torch.equal(sere_ids_direct(ids, sim, S, rho, scope), ids)


def test_bad_placement_and_scope_raise():
    ids = torch.zeros(3, 1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="D to divide E"):
        layer_metrics(ids, 8)
    for route in (sere_ids, sere_ids_direct):
        with pytest.raises(ValueError, match="scope"):
            route(ids, torch.eye(8), 1, 0.0, "everywhere")


def test_grouped_routing_stays_in_its_groups():
    ids = grouped_ids(500, 256, 8, 8, 4, seed=0)  # T, k
    groups = ids // 32
    assert all(len(set(row.tolist())) <= 4 for row in groups)
    assert all(len(set(row.tolist())) == 8 for row in ids)
    assert len(set(groups.reshape(-1).tolist())) == 8  # every group gets picked by someone


def test_split_ids_and_doubled_similarity():
    ids = torch.tensor([[0, 3, 5], [1, 2, 4]])
    big = split_ids(ids, seed=0)
    assert torch.equal(big // 2, ids) and int(big.max()) < 12
    sim = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    sim.fill_diagonal_(1.0)
    d = doubled_similarity(sim)
    assert d.shape == (12, 12) and torch.all(d.diagonal() == 1)
    assert d[2 * 1 + 1, 2 * 4] == sim[1, 4] and d[2 * 5, 2 * 0 + 1] == sim[5, 0]
    twin = (sim.sum(1) - 1) / 5
    assert torch.allclose(d[2 * 3, 2 * 3 + 1], twin[3])


def test_trace_rows_use_every_row_before_repeating():
    rows = trace_rows(10, 25, seed=1)
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:20].tolist()) == list(range(10))


@pytest.mark.parametrize("E", [128, 256])
def test_trace_source_is_deterministic_and_in_range(E):
    src = routing_source("trace", E, 8)
    a, sim = src.draw(4, 3, 2)
    b, _ = src.draw(4, 3, 2)
    assert torch.equal(a, b) and a.shape == (4, 3, 8)
    assert 0 <= int(a.min()) and int(a.max()) < E and sim.shape == (E, E)
    assert float(sim.min()) >= 0  # so rho = 0 moves every secondary slot, as the report says
    assert not torch.equal(a, src.draw(4, 3, 3)[0])


def test_cell_rows_stock_ratios_and_draws():
    sweep = Sweep(settings=((1, 0.0),), target_tokens=8, min_draws=2, max_draws=3)
    src = routing_source("uniform", 256, 8)
    rows = cell_rows(MODELS["DeepSeek-V3"], src, 2, 4, sweep)
    assert [r["scope"] for r in rows] == ["stock", "per_rank", "global"]
    assert rows[0]["slowest_vs_stock"] == 1.0 and rows[0]["draws"] == 3
    assert rows[1]["experts_slowest"] == rows[2]["experts_slowest"] <= rows[0]["experts_slowest"]
    assert rows[0]["slowest_gb_step"] == pytest.approx(rows[0]["experts_slowest"] * 3 * 7168 * 2048 * 1 * 58 / 1e9)


def test_verdict_arithmetic():
    base = dict(model="Qwen3-235B-A22B", routing="r", B=1, setting="S=1 rho=0.5", rho=0.5, busiest_rank_copies=5)
    rows = []
    for D in (8, 16):
        rows += [dict(base, D=D, scope="stock", experts_slowest=4.0),
                 dict(base, D=D, scope="per_rank", experts_slowest=3.0),
                 dict(base, D=D, scope="global", experts_slowest=1.0)]
    asm = Assumptions(hbm_gbps=2000.0, collective_us_node=5.0, collective_us_cross=30.0)
    vs = {v["D"]: v for v in verdicts(rows, asm, 2.0)}
    per_expert_us = 3 * 4096 * 1536 * 2 / 2000e3
    assert vs[8]["weights_us"] == pytest.approx(2 * per_expert_us)
    assert vs[8]["net_weights_us"] == pytest.approx(2 * per_expert_us - 5.0)
    assert vs[16]["collective_us"] == 30.0 and vs[16]["a2a_us"] == 0.0


def test_end_to_end_tiny(tmp_path):
    main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "ep_simulation.json").read_text())
    cells = sum(len(TINY.routings[m]) * len(TINY.batches) * len(MODELS[m].ep_degrees(TINY.degrees)) for m in TINY.models)
    assert len(data["rows"]) == cells * (1 + 2 * len(TINY.settings))
    md = (tmp_path / "ep_simulation.md").read_text()
    assert "## Findings" in md and "### Qwen3-235B-A22B, zipf:1.2" in md
    assert (tmp_path / "ep_simulation.png").stat().st_size > 10_000
