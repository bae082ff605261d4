"""Fidelity metrics (sere.harness.fidelity) on tiny random models: the plumbing, not the zoo's numbers.

    pytest tests/test_fidelity.py -q

Checks the batch layout, the per-step expert counts against a set-based loop, that the
per-step transform is what decoding does (teacher-forced with per-position grouping equals
token-by-token decoding with the KV cache), that the stock setting scores perfect fidelity,
and that re-routing moves every metric the expected way.
"""
from __future__ import annotations

import math

import pytest
import torch

from sere.harness.fidelity import (
    Composition,
    PerStepTransform,
    StepExpertCounter,
    Tolerance,
    cache_kwargs,
    distinct_per_step,
    fidelity,
    gate_failures,
    greedy_continuation,
    leading_matches,
    reference_pass,
    setting_key,
)
from sere.harness.methods import get_method
from sere.harness.model_configs import build_tiny_model, num_experts_of

ARCHS = ("qwen2_moe", "deepseek_v2")  # deepseek_v2: unsorted top-k, a dense first layer
# (T tokens = B * L, E experts, k): odd sizes and extremes
STEP_CASES = [(1, 1, 8, 4), (3, 5, 8, 4), (7, 33, 60, 8), (16, 2, 33, 1)]


def _sims(model, seed=0):
    from sere.hf import find_routers

    g = torch.Generator().manual_seed(seed)
    out = {}
    for site in find_routers(model):
        a = torch.rand(site.num_experts, site.num_experts, generator=g)
        out[site.layer] = (a + a.T) / 2
    return out


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model = build_tiny_model(request.param, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(2))
    return model, ids, _sims(model)


def test_composition_puts_far_apart_windows_in_one_batch():
    ids = torch.arange(12 * 5)
    b = Composition(batch_size=3, seq_len=5, num_windows=12).batches(ids)  # n=4, B=3, L=5
    assert b.shape == (4, 3, 5)
    # batch j holds windows j, j+4, j+8
    assert b[1, :, 0].tolist() == [5, 25, 45]
    assert sorted(b.reshape(-1).tolist()) == ids.tolist()  # every token exactly once


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=5, num_windows=12), "multiple of batch_size"),
        (dict(batch_size=0), "positive int"),
        (dict(batch_size=2, seq_len=1, num_windows=4), "at least 2"),
    ],
)
def test_composition_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Composition(**kwargs)


def test_composition_rejects_short_stream():
    with pytest.raises(ValueError, match="need 64 tokens"):
        Composition(batch_size=2, seq_len=8, num_windows=8).batches(torch.arange(63))


@pytest.mark.parametrize("B, L, E, k", STEP_CASES)
def test_distinct_per_step_matches_sets(B, L, E, k):
    g = torch.Generator().manual_seed(B * 1000 + L)
    ids = torch.randint(-1, E + 2, (B * L, k), generator=g)  # includes invalid ids
    want = [len({int(e) for b in range(B) for e in ids[b * L + t] if 0 <= e < E}) for t in range(L)]
    assert distinct_per_step(ids, B, E).tolist() == want


def test_per_step_transform_is_one_call_per_position():
    B, L, E, k = 4, 6, 16, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B * L)])  # T, k
    sim = torch.rand(E, E, generator=g)
    sere = get_method("sere", backend="torch")
    got = PerStepTransform(sere, B)(ids, sim, 1, 0.0)
    steps = ids.view(B, L, k)
    for t in range(L):
        assert torch.equal(got.view(B, L, k)[:, t], sere(steps[:, t], sim, 1, 0.0))
    # Grouping matters: one call over all B*L tokens has a larger primary set.
    assert not torch.equal(got, sere(ids, sim, 1, 0.0))


def test_per_step_transform_rejects_ragged_batch():
    with pytest.raises(ValueError, match="multiple of the batch size"):
        PerStepTransform(get_method("stock"), 4)(torch.zeros(6, 2, dtype=torch.long), torch.eye(3), 1, 0.0)


def test_leading_matches():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [9, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 4], [1, 2, 3, 4]])
    assert leading_matches(a, b).tolist() == [4, 2, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_grouping_equals_token_by_token_decoding(arch):
    """The module's central claim: re-routing per position in one [B, L] forward gives the
    same log-probs as decoding the B sequences together one token at a time."""
    import sere.hf

    model = build_tiny_model(arch, seed=3, dtype=torch.float64)
    model.config._experts_implementation = "eager"  # grouped_mm has no float64 on the CPU
    B, L = 3, 7
    x = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(4))
    sims = _sims(model, seed=5)
    transform = get_method("sere", backend="torch")
    with torch.no_grad():
        with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, method=PerStepTransform(transform, B), record_stats=False):
            full = model(input_ids=x).logits  # B, L, V
        with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, method=transform, record_stats=False):
            out = model(input_ids=x[:, :1], use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(1, L):
                out = model(input_ids=x[:, t : t + 1], use_cache=True, **cache_kwargs(model, out))
                steps.append(out.logits[:, -1])
        stock = model(input_ids=x).logits
    # float64 throughout except DeepSeek-V2's router, which computes its logits in float32
    torch.testing.assert_close(full, torch.stack(steps, dim=1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full, stock)  # and re-routing did change something


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_hands_the_cache_on_without_deprecation_warnings(arch):
    """greedy_continuation passes the KV cache by the keyword the installed transformers takes
    (`cache`, or `past_key_values` before 5.2x): no FutureWarning, and the same tokens as
    decoding without a cache."""
    import warnings

    model = build_tiny_model(arch, seed=1)
    prompts = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = greedy_continuation(model, prompts, gen_len=4)
    seq = prompts
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 5:])
    assert set(cache_kwargs(model, model(input_ids=prompts, use_cache=True))) <= {"cache", "past_key_values"}


def test_stock_setting_has_perfect_fidelity(tiny):
    model, ids, sims = tiny
    comp = Composition(batch_size=4, seq_len=16, num_windows=8)
    ref = reference_pass(model, ids, comp, prompt_len=4, gen_len=6)
    k = model.config.num_experts_per_tok
    for m in (fidelity(model, ref, sims, select_top_k=k, threshold=0.0),  # S = k: SERE is off
              fidelity(model, ref, sims, select_top_k=1, threshold=0.0, method="stock")):
        assert m.kl == pytest.approx(0.0, abs=1e-7)
        assert m.top1_agreement == 1.0 and m.ppl_ratio == pytest.approx(1.0, abs=1e-6)
        assert m.match_length == 6.0
        assert m.experts_before == m.experts_after == pytest.approx(ref.experts)


@pytest.mark.parametrize("method", ["sere", "random", "truncate", "oea"])
def test_rerouting_reduces_experts_and_costs_fidelity(tiny, method):
    model, ids, sims = tiny
    B = 4
    comp = Composition(batch_size=B, seq_len=16, num_windows=8)
    ref = reference_pass(model, ids, comp, prompt_len=4, gen_len=6)
    m = fidelity(model, ref, sims, select_top_k=1, threshold=0.0, method=method)
    E = num_experts_of(model.config)
    assert m.experts_after < m.experts_before <= E
    assert m.experts_after <= B  # S = 1, rho = 0: only the primary experts stay
    assert m.kl > 0 and m.top1_agreement < 1.0 and 0 <= m.match_length <= 6
    assert set(m.experts_after_per_layer) == {s for s in sims}


def test_counter_before_and_after_enable_see_stock_and_rerouted_ids(tiny):
    import sere.hf

    model, ids, sims = tiny
    B = 4
    x = ids[: B * 8].view(B, 8)
    before = StepExpertCounter(model, B)
    transform = get_method("sere", backend="torch")
    handle = sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, method=PerStepTransform(transform, B), record_stats=False)
    after = StepExpertCounter(model, B)
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        handle.remove(), before.remove(), after.remove()
    assert all(after.per_layer()[layer] < before.per_layer()[layer] for layer in sims)
    assert max(after.per_layer().values()) <= B


def test_setting_key():
    assert setting_key("sere", 2, 0.1) == "sere:S=2:rho=0.1"
    assert setting_key("random", 1, 0) == "random:S=1:rho=0"


def test_gate_failures_reports_both_directions():
    tol = {"kl": Tolerance(abs=0.0, rel=0.1), "top1_agreement": Tolerance(abs=0.01)}
    gold = {"sere:S=1:rho=0": {"kl": 1.0, "top1_agreement": 0.9}}
    assert gate_failures({"sere:S=1:rho=0": {"kl": 1.05, "top1_agreement": 0.905}}, gold, tol) == []
    worse = gate_failures({"sere:S=1:rho=0": {"kl": 1.2, "top1_agreement": 0.9}}, gold, tol)
    better = gate_failures({"sere:S=1:rho=0": {"kl": 1.0, "top1_agreement": 0.95}}, gold, tol)
    assert len(worse) == 1 and "WORSE" in worse[0] and "kl" in worse[0]
    assert len(better) == 1 and "better" in better[0] and "top1_agreement" in better[0]
    assert gate_failures({}, gold, tol) == ["sere:S=1:rho=0: not measured (the goldens have it)"]
    assert gate_failures({"sere:S=1:rho=0": {"kl": math.nan, "top1_agreement": 0.9}}, gold, tol)
