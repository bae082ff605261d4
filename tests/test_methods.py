"""The comparison routing methods (sere.harness.methods): contract frame, parity with their plain-loop
references, and what makes each a fair control.

    pytest tests/test_methods.py

Each case draws fresh random inputs from its own seed; ids compare exactly.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
import numpy as np
import pytest
import torch

import sere
from sere.harness import methods
from sere.stats import distinct_experts
from tests.helpers import random_similarity, random_topk_ids

CONTROLS = ("random", "truncate", "oea")

# (T, E, k, S, rho, invalid share): extremes and odd sizes. S = 0 and S = k are identities.
CASES = (
    (1, 8, 4, 1, 0.0, 0.0),
    (2, 8, 4, 2, 0.5, 0.0),
    (33, 60, 8, 2, 0.1, 0.05),
    (33, 60, 8, 1, 0.0, 0.2),
    (256, 128, 8, 3, 0.35, 0.05),
    (7, 3, 2, 1, 0.7, 0.0),
    (511, 64, 6, 5, 0.0, 0.0),
    (5, 8, 4, 0, 0.0, 0.0),
    (5, 8, 4, 4, 0.0, 0.0),
    (0, 8, 4, 1, 0.0, 0.0),
)
CASE_IDS = [f"T{c[0]}-E{c[1]}-k{c[2]}-S{c[3]}-rho{c[4]}-inv{c[5]}" for c in CASES]


def _case(T, E, k, S, rho, invalid, *, salt=0):
    rng = np.random.default_rng([T, E, k, S, int(rho * 100), int(invalid * 100), salt])
    ids = random_topk_ids(rng, T, E, k, invalid_frac=invalid)
    sim = random_similarity(rng, E)
    return ids, sim


def _valid_set(ids: torch.Tensor, E: int) -> set[int]:
    return {int(e) for e in ids.flatten() if 0 <= e < E}


def _primary_set(ids: torch.Tensor, E: int, S: int) -> set[int]:
    return _valid_set(ids[:, : max(S, 0)], E)


def _run(name, ids, sim, S, rho, seed=0):
    return methods.get_method(name, **({"seed": seed} if name == "random" else {}))(ids, sim, S, rho)


def _draws(ids, S, seed=0):
    """The uniform numbers `random_reroute` draws for these ids with `seed`."""
    T, k = ids.shape
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    return torch.rand(T, k - S, generator=gen, device=ids.device)


def _reference(name, ids, sim, S, rho, seed=0):
    args = (ids.numpy(), sim.numpy(), S, rho)
    if name == "random":
        if S <= 0 or S >= ids.shape[1]:
            return ids.numpy().copy()
        return methods.random_reroute_reference(*args, _draws(ids, S, seed).numpy())
    return {"truncate": methods.truncate_reference, "oea": methods.oea_reference}[name](*args)


# ---- the frame every control shares -------------------------------------------------------


@pytest.mark.parametrize("name", CONTROLS)
@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES, ids=CASE_IDS)
def test_control_matches_plain_loop(name, T, E, k, S, rho, invalid):
    ids, sim = _case(T, E, k, S, rho, invalid)
    got = _run(name, ids, sim, S, rho)
    assert got.shape == ids.shape and got.dtype == ids.dtype
    np.testing.assert_array_equal(got.numpy(), _reference(name, ids, sim, S, rho))


@pytest.mark.parametrize("name", CONTROLS)
@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES, ids=CASE_IDS)
def test_control_keeps_primaries_and_never_adds_experts(name, T, E, k, S, rho, invalid):
    ids, sim = _case(T, E, k, S, rho, invalid)
    got = _run(name, ids, sim, S, rho)
    if S <= 0 or S >= k:
        assert torch.equal(got, ids)
        return
    assert torch.equal(got[:, :S], ids[:, :S])  # primary slots untouched
    invalid_in = (ids < 0) | (ids >= E)
    assert torch.equal(got[invalid_in], ids[invalid_in])  # invalid ids pass through
    assert _valid_set(got, E) <= _valid_set(ids, E)  # only ever onto experts already active
    assert int(distinct_experts(got, E)) <= int(distinct_experts(ids, E))
    moved = got != ids
    primaries = _primary_set(ids, E, S)
    assert {int(e) for e in got[moved]} <= primaries  # a moved slot lands on a primary expert


def test_controls_reduce_experts_on_a_typical_batch():
    """Guard against a control that never moves anything (it would pass the checks above)."""
    ids, sim = _case(64, 64, 8, 1, 0.0, 0.0)
    before = int(distinct_experts(ids, 64))
    for name in CONTROLS:
        after = int(distinct_experts(_run(name, ids, sim, 1, 0.0), 64))
        assert after == len(_primary_set(ids, 64, 1)) < before, name


@pytest.mark.parametrize("name", CONTROLS)
def test_control_keeps_int32_ids(name):
    ids, sim = _case(33, 60, 8, 2, 0.1, 0.05)
    got32 = _run(name, ids.to(torch.int32), sim, 2, 0.1)
    assert got32.dtype == torch.int32
    assert torch.equal(got32.long(), _run(name, ids, sim, 2, 0.1))


# ---- what makes each a fair control -------------------------------------------------------


@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES[:7], ids=CASE_IDS[:7])
def test_random_moves_exactly_the_slots_sere_moves(T, E, k, S, rho, invalid):
    ids, sim = _case(T, E, k, S, rho, invalid)
    rand = _run("random", ids, sim, S, rho)
    ser = sere.reroute(ids, sim, S, rho, backend="reference")
    assert torch.equal(rand != ids, ser != ids)
    assert _valid_set(rand, E) <= _valid_set(ser, E) | _primary_set(ids, E, S)
    # Same activated experts as SERE: the kept slots are the same, the moved land in P.
    assert _valid_set(rand, E) == _valid_set(ser, E)


def test_random_is_seeded_and_spreads_over_primaries():
    rng = np.random.default_rng(11)
    E, T = 64, 512
    # Slot 0 from experts 0..7, the rest from 8..63: |P| <= 8 and every secondary moves.
    head = rng.integers(0, 8, size=(T, 1))
    tail = np.stack([rng.choice(np.arange(8, E), size=7, replace=False) for _ in range(T)])
    ids = torch.from_numpy(np.concatenate([head, tail], axis=1))  # T, 8
    sim = random_similarity(rng, E)
    a, b = _run("random", ids, sim, 1, 0.0, seed=3), _run("random", ids, sim, 1, 0.0, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, _run("random", ids, sim, 1, 0.0, seed=4))
    assert bool((a[:, 1:] != ids[:, 1:]).all())
    # 3584 moved slots over |P| <= 8 primaries: every primary is drawn.
    assert {int(e) for e in a[:, 1:].flatten()} == _primary_set(ids, E, 1)


def test_random_method_object_advances_its_generator():
    ids, sim = _case(64, 64, 8, 2, 0.0, 0.0)
    rr = methods.get_method("random", seed=0)
    first, second = rr(ids, sim, 2, 0.0), rr(ids, sim, 2, 0.0)
    assert not torch.equal(first, second)
    assert torch.equal(first, methods.get_method("random", seed=0)(ids, sim, 2, 0.0))


def test_random_ignores_threshold_only_through_sere_moves():
    """With rho above every similarity SERE moves nothing, so random moves nothing either."""
    ids, sim = _case(64, 64, 8, 1, 0.0, 0.0)
    assert torch.equal(_run("random", ids, sim, 1, 1.5), ids)


def test_truncate_folds_every_secondary_onto_own_top_expert():
    ids = torch.tensor([[5, 1, 2, 3], [1, 5, 0, 7], [-1, 6, 4, 2], [-1, -1, 3, 4]])  # T=4, k=4
    sim = torch.zeros(8, 8)
    got = methods.truncate(ids, sim, 2, 0.0)
    want = torch.tensor([[5, 1, 5, 5], [1, 5, 1, 1], [-1, 6, 6, 6], [-1, -1, 3, 4]])
    assert torch.equal(got, want)  # last token: no valid primary slot, keeps its secondaries


def test_oea_keeps_loaded_secondaries_and_folds_the_rest():
    ids = torch.tensor([[5, 1, 2, 3], [1, 2, 0, 7], [6, 4, 5, 3]])  # T=3, k=4; P (S=1) = {5, 1, 6}
    sim = torch.zeros(8, 8)
    got = methods.oea(ids, sim, 1, 0.0)
    want = torch.tensor([[5, 1, 5, 5], [1, 1, 1, 1], [6, 6, 5, 6]])
    assert torch.equal(got, want)


@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES[:7], ids=CASE_IDS[:7])
def test_truncate_and_oea_activate_exactly_the_primary_set(T, E, k, S, rho, invalid):
    ids, sim = _case(T, E, k, S, rho, invalid)
    head_valid = ((ids[:, :S] >= 0) & (ids[:, :S] < E)).any(dim=1)
    if not bool(head_valid.all()):
        ids = ids[head_valid]  # a token without a valid primary slot keeps its secondaries
    P = _primary_set(ids, E, S)
    assert _valid_set(methods.truncate(ids, sim, S, rho), E) == P
    assert _valid_set(methods.oea(ids, sim, S, rho), E) == P


# ---- weight-level drop helpers --------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES, ids=CASE_IDS)
def test_keep_masks_agree_with_the_id_transforms(T, E, k, S, rho, invalid):
    ids, sim = _case(T, E, k, S, rho, invalid)
    # A slot is dropped by the mask exactly where the id transform folds a valid id away,
    # or folds it onto the same id (a secondary equal to its token's top expert cannot occur).
    has_top = ((ids[:, : max(S, 1)] >= 0) & (ids[:, : max(S, 1)] < E)).any(dim=1, keepdim=True)
    for mask, fold in (
        (methods.truncation_keep_mask(ids, S), methods.truncate(ids, sim, S, rho)),
        (methods.oea_keep_mask(ids, E, S), methods.oea(ids, sim, S, rho)),
    ):
        assert mask.shape == ids.shape and mask.dtype == torch.bool
        if S <= 0 or S >= k:
            assert bool(mask.all())
            continue
        assert bool(mask[:, :S].all())
        valid = (ids >= 0) & (ids < E)
        changed = fold != ids
        assert torch.equal(changed, ~mask & valid & has_top)


def test_apply_keep_mask_zeroes_and_renormalises():
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.5, 0.0, 0.0]])
    keep = torch.tensor([[True, True, False, False], [False, False, False, False]])
    plain = methods.apply_keep_mask(w, keep, renormalize=False)
    assert torch.equal(plain, torch.tensor([[0.4, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    renorm = methods.apply_keep_mask(w, keep, renormalize=True)
    torch.testing.assert_close(renorm[0], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    assert torch.equal(renorm[1], w[1])  # nothing kept: weights stay


# ---- drop: the weight-level control -----------------------------------------------------


def _weights(ids: torch.Tensor, *, ties: bool, salt: int = 0) -> torch.Tensor:
    """[T, k] positive weights in contract order (descending); `ties` quantises them to a few
    levels so equal weights (broken by slot order) are frequent."""
    T, k = ids.shape
    rng = np.random.default_rng([T, k, int(ties), salt])
    w = rng.random((T, k)) + 0.05
    if ties:
        w = np.round(w * 2) / 2 + 0.5
    return torch.from_numpy(-np.sort(-w, axis=1).astype(np.float32))  # T, k


def _shuffled(ids, w, seed=0):
    """The same routing with each token's slots in a random order (as DeepSeek-V2's router gives)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(ids.shape[1], generator=gen) for _ in range(ids.shape[0])]) if len(ids) else \
        torch.zeros_like(ids)
    return ids.gather(1, perm), w.gather(1, perm)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES, ids=CASE_IDS)
def test_drop_matches_plain_loop(T, E, k, S, rho, invalid, ties):
    ids, _ = _case(T, E, k, S, rho, invalid)
    w = _weights(ids, ties=ties)
    for order in ("contract", "shuffled"):
        x, y = (ids, w) if order == "contract" else _shuffled(ids, w)
        got_ids, got_w = methods.drop(x, y, E, S)
        assert got_ids.dtype == x.dtype and got_w.dtype == y.dtype and got_w.shape == y.shape
        want_ids, want_w = methods.drop_reference(x.numpy(), y.numpy(), E, S)
        np.testing.assert_array_equal(got_ids.numpy(), want_ids, err_msg=order)
        np.testing.assert_array_equal(got_w.numpy(), want_w, err_msg=order)  # exact: kept weights untouched


@pytest.mark.parametrize("T,E,k,S,rho,invalid", CASES, ids=CASE_IDS)
def test_drop_removes_truncates_slots_and_does_not_renormalise(T, E, k, S, rho, invalid):
    ids, sim = _case(T, E, k, S, rho, invalid)
    w = _weights(ids, ties=False)
    got_ids, got_w = methods.drop(ids, w, E, S)
    assert torch.equal(got_ids, methods.truncate(ids, sim, S, rho))  # same ids, so same experts
    removed = got_w == 0  # every input weight is >= 0.05
    if S <= 0 or S >= k:
        assert torch.equal(got_w, w)
        return
    # the removed slots are truncate's: valid secondaries of tokens with a valid primary slot
    has_top = ((ids[:, :S] >= 0) & (ids[:, :S] < E)).any(dim=1, keepdim=True)
    assert torch.equal(removed, ~methods.truncation_keep_mask(ids, S) & (ids >= 0) & (ids < E) & has_top)
    assert torch.equal(removed, got_ids != ids)  # and exactly those ids fold
    assert torch.equal(got_w, methods.apply_keep_mask(w, ~removed, renormalize=False))
    assert bool((got_w[removed] == 0).all()) and torch.equal(got_w[~removed], w[~removed])
    if bool(removed.any()):  # no renormalisation: those tokens lose weight
        assert bool((got_w.sum(1)[removed.any(1)] < w.sum(1)[removed.any(1)]).all())


def test_drop_edge_cases_by_hand():
    ids = torch.tensor([[5, 1, 2, 3], [-1, -1, 3, 4], [6, 9, 2, -1]])  # T=3, k=4, E=8
    w = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.2, 0.1]])
    got_ids, got_w = methods.drop(ids, w, 8, 1)
    # token 0 (unsorted): its top expert is 1 (weight 0.4); token 1 has no valid top slot and keeps
    # everything; token 2: invalid ids (9, -1) pass through with their weights, 2 folds onto 6
    assert torch.equal(got_ids, torch.tensor([[1, 1, 1, 1], [-1, -1, 3, 4], [6, 9, 6, -1]]))
    assert torch.equal(got_w, torch.tensor([[0.0, 0.4, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.0, 0.1]]))


def test_drop_rejects_bad_inputs():
    ids, w = torch.tensor([[1, 2]]), torch.tensor([[0.6, 0.4]])
    with pytest.raises(TypeError, match="integer"):
        methods.drop(ids.float(), w, 4, 1)
    with pytest.raises(TypeError, match="floating"):
        methods.drop(ids, ids, 4, 1)
    with pytest.raises(ValueError, match="shape of topk_ids"):
        methods.drop(ids, w[:, :1], 4, 1)
    with pytest.raises(ValueError, match="num_experts"):
        methods.drop(ids, w, 0, 1)
    with pytest.raises(TypeError, match="select_top_k"):
        methods.drop(ids, w, 4, 1.0)


def _experts_inputs(model):
    """Per MoE layer, the (ids, weights) the router returned and the experts module received."""
    import sere.hf

    got = {"router": {}, "experts": {}}
    hooks = []
    for site in sere.hf.find_routers(model):
        block = model.get_submodule(site.name.rpartition(".")[0])
        hooks.append(site.module.register_forward_hook(
            lambda m, a, out, L=site.layer: got["router"].__setitem__(L, (out[2].clone(), out[1].clone()))))
        hooks.append(block.experts.register_forward_pre_hook(
            lambda m, a, L=site.layer: got["experts"].__setitem__(L, (a[1].clone(), a[2].clone()))))
    return got, hooks


@pytest.mark.parametrize("drop_first", [True, False])
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])  # sorted and unsorted routers
def test_dropping_weights_with_truncate_feeds_the_experts_drop(arch, drop_first):
    """Through the transformers hook: router weights zeroed by dropping_weights, ids folded by
    the truncate transform, in either registration order; the experts module receives exactly
    drop_reference of the router's output, in every MoE layer."""
    import sere.hf
    from sere.harness.model_configs import build_tiny_model

    model = build_tiny_model(arch)
    E_tiny, S = 8, 1
    sims = {s.layer: torch.rand(E_tiny, E_tiny) for s in sere.hf.find_routers(model)}
    got, hooks = _experts_inputs(model)
    tokens = torch.randint(2, 256, (2, 3), generator=torch.Generator().manual_seed(0))  # B, L
    first = methods.dropping_weights(model, S) if drop_first else None
    handle = sere.hf.enable(model, sims, select_top_k=S, threshold=0.0, method="truncate", record_stats=False)
    second = None if drop_first else methods.dropping_weights(model, S)
    with torch.no_grad():
        model(tokens)
    for h in hooks + [handle, first or second]:
        h.remove()
    assert got["experts"] and set(got["experts"]) == set(got["router"])
    for layer, (r_ids, r_w) in got["router"].items():
        want_ids, want_w = methods.drop_reference(r_ids.numpy(), r_w.float().numpy(), E_tiny, S)
        e_ids, e_w = got["experts"][layer]
        np.testing.assert_array_equal(e_ids.numpy(), want_ids)
        np.testing.assert_array_equal(e_w.float().numpy(), want_w)
        assert int((e_w == 0).sum()) == r_ids.numel() - r_ids.shape[0] * S  # every secondary dropped


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_drop_output_is_the_token_without_the_removed_experts(arch):
    """A zero-weighted fold adds nothing: with truncate folding the ids the logits equal those of
    the zeroed weights alone (the removed experts still routed, at weight 0); and they differ from
    truncate's (which gives the removed weight to the top expert) and from stock."""
    import sere.hf
    from sere.harness.model_configs import build_tiny_model

    model = build_tiny_model(arch)
    S = 1
    sims = {s.layer: torch.rand(8, 8) for s in sere.hf.find_routers(model)}
    tokens = torch.randint(2, 256, (3, 5), generator=torch.Generator().manual_seed(1))  # B, L

    def run(drop_weights: bool, method: str | None):
        ctx = methods.dropping_weights(model, S) if drop_weights else None
        handle = sere.hf.enable(model, sims, select_top_k=S, threshold=0.0, method=method, record_stats=False) \
            if method else None
        try:
            with torch.no_grad():
                return model(tokens).logits  # B, L, V
        finally:
            for h in (handle, ctx):
                if h is not None:
                    h.remove()

    dropped = run(True, "truncate")
    torch.testing.assert_close(dropped, run(True, None), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dropped, run(False, "truncate"), atol=1e-4)
    assert not torch.allclose(dropped, run(False, None), atol=1e-4)


def test_dropping_weights_rejects_a_model_without_routers():
    with pytest.raises(ValueError, match="no MoE router"):
        methods.dropping_weights(torch.nn.Linear(2, 2), 1)


# ---- registry and errors ------------------------------------------------------------------


def test_registry_names_every_method_and_sere_is_sere():
    assert set(methods.METHODS) == {"stock", "sere", "random", "truncate", "oea"}
    ids, sim = _case(33, 60, 8, 2, 0.1, 0.05)
    assert torch.equal(methods.get_method("stock")(ids, sim, 2, 0.1), ids)
    assert torch.equal(
        methods.get_method("sere", backend="torch")(ids, sim, 2, 0.1),
        sere.reroute(ids, sim, 2, 0.1, backend="reference"),
    )


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown routing method 'nope'"):
        methods.get_method("nope")
    # drop needs the weights: an ids-only registry entry would silently run truncate
    assert "drop" in methods.WEIGHT_METHODS and "drop" not in methods.METHODS
    with pytest.raises(ValueError, match="changes router weights"):
        methods.get_method("drop")
    with pytest.raises(TypeError, match="takes no option"):
        methods.get_method("truncate", seed=1)
    with pytest.raises(TypeError, match="takes no option"):
        methods.get_method("sere", seed=1)


@pytest.mark.parametrize("name", CONTROLS)
def test_controls_reject_bad_inputs(name):
    ids, sim = _case(5, 8, 4, 1, 0.0, 0.0)
    fn = methods.get_method(name)
    with pytest.raises(TypeError, match="integer"):
        fn(ids.float(), sim, 1, 0.0)
    with pytest.raises(ValueError, match="square"):
        fn(ids, sim[:, :7], 1, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        fn(ids[0], sim, 1, 0.0)
    with pytest.raises(TypeError, match="select_top_k"):
        fn(ids, sim, 1.0, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CONTROLS)
def test_control_on_cuda_matches_plain_loop(name):
    ids, sim = _case(256, 128, 8, 2, 0.1, 0.05)
    got = _run(name, ids.cuda(), sim.cuda(), 2, 0.1)
    if name == "random":  # CUDA draws differ from CPU draws: feed the reference the CUDA ones
        want = methods.random_reroute_reference(ids.numpy(), sim.numpy(), 2, 0.1, _draws(ids.cuda(), 2).cpu().numpy())
    else:
        want = _reference(name, ids, sim, 2, 0.1)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.gpu
def test_drop_on_cuda_matches_plain_loop():
    ids, _ = _case(256, 128, 8, 2, 0.1, 0.05)
    x, y = _shuffled(ids, _weights(ids, ties=True))
    got_ids, got_w = methods.drop(x.cuda(), y.cuda(), 128, 2)
    want_ids, want_w = methods.drop_reference(x.numpy(), y.numpy(), 128, 2)
    np.testing.assert_array_equal(got_ids.cpu().numpy(), want_ids)
    np.testing.assert_array_equal(got_w.cpu().numpy(), want_w)
