"""Substitution similarity (sere.calibration.substitution): vectorised vs the loop, its
defining cases, the model pass and the command.

    pytest tests/test_calibration_substitution.py        # add -m "not slow" for the metric alone
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sere.artifact import load_similarity
from sere.calibration import __main__ as cli
from sere.calibration.calibrate import calibrate
from sere.calibration.experts import all_expert_outputs, find_moe_layers
from sere.calibration.metrics import METHODS, similarity_matrix
from sere.calibration.substitution import (
    SIM_RANGE,
    SubstitutionAccumulator,
    calibrate_substitution,
    routed_weight_squares,
    substitution_matrix,
    substitution_pairwise,
)
from sere.harness.model_configs import build_tiny_model
from tests.test_calibration_cli import save_tiny

# (experts, tokens, hidden, k, seed): one expert and k = E at the extremes, odd sizes between.
SHAPES = ((1, 5, 3, 1, 0), (2, 1, 4, 1, 1), (5, 17, 7, 2, 2), (8, 33, 16, 4, 3), (6, 9, 5, 6, 4))
WEIGHTINGS = ("router", "uniform")


def random_routing(e, n, k, seed, *, invalid=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])  # N, k distinct per token
    w = torch.rand(n, k, generator=g).softmax(-1)  # N, k
    if invalid and n > 1:
        ids[0, -1] = -1  # an expert-parallel "not here" id: ignored
        ids[-1, 0] = e
    return ids, w


def case(e, n, d, k, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(e, n, d, generator=g), *random_routing(e, n, k, seed)


# ---------------------------------------------------------------------------- the metric


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vectorised_equals_the_pairwise_loop(shape, weighting):
    outputs, ids, w = case(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny cases can leave an expert unrouted
        got = substitution_matrix(outputs, ids, w, weighting)
        want = substitution_pairwise(outputs, ids, w, weighting)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got.diagonal(), torch.ones(shape[0]))
    assert SIM_RANGE[0] <= got.min() and got.max() <= SIM_RANGE[1]


def test_invalid_ids_are_ignored_like_the_loop():
    outputs = torch.randn(5, 12, 6, generator=torch.Generator().manual_seed(7))
    ids, w = random_routing(5, 12, 2, 7, invalid=True)
    torch.testing.assert_close(substitution_matrix(outputs, ids, w), substitution_pairwise(outputs, ids, w), rtol=0, atol=1e-6)


def test_accumulating_chunks_equals_one_pass():
    outputs, ids, w = case(6, 40, 8, 3, 5)
    acc = SubstitutionAccumulator(6)
    for start in (0, 7, 19):  # uneven chunks
        stop = {0: 7, 7: 19, 19: 40}[start]
        acc.update(outputs[:, start:stop], ids[start:stop], w[start:stop])
    torch.testing.assert_close(acc.result(), substitution_matrix(outputs, ids, w), rtol=0, atol=1e-6)


def test_an_exact_copy_gets_sim_one_both_ways():
    outputs, ids, w = case(6, 50, 8, 3, 8)
    outputs[4] = outputs[1]  # expert 4 is an exact copy of expert 1
    sim = substitution_matrix(outputs, ids, w)
    assert sim[1, 4] == pytest.approx(1.0, abs=1e-6) and sim[4, 1] == pytest.approx(1.0, abs=1e-6)
    off = sim.masked_fill(torch.eye(6, dtype=torch.bool), -2)
    assert off.max() == pytest.approx(1.0, abs=1e-6) and (off > 0.9).sum() == 2  # only the copy pair


def test_a_zero_expert_is_no_better_than_dropping():
    outputs, ids, w = case(5, 40, 6, 2, 9)
    outputs[2] = 0  # a zero expert as the candidate costs exactly what dropping j costs: sim 0
    with pytest.warns(RuntimeWarning, match=r"expert\(s\) \[2\]"):  # and as the moved expert it has no error to measure
        sim = substitution_matrix(outputs, ids, w)
    assert (sim[[0, 1, 3, 4], 2] <= 1e-6).all()  # 0 up to float64 rounding of the sums
    assert sim[[0, 1, 3, 4], 2] == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(sim[2], torch.eye(5)[2])  # its own row: 0, diagonal 1


def test_asymmetric_as_the_contract_reads_it():
    # Expert 1 = 0.5 x expert 0. Standing in for 1, expert 0 doubles it: err 1 -> sim 0.
    # Standing in for 0, expert 1 halves it: err 0.25 -> sim 0.75.
    outputs = torch.randn(3, 30, 4, generator=torch.Generator().manual_seed(10))
    outputs[1] = 0.5 * outputs[0]
    ids = torch.tensor([[0, 1]] * 30)
    w = torch.full((30, 2), 0.5)
    with pytest.warns(RuntimeWarning, match=r"expert\(s\) \[2\]"):  # never routed
        sim = substitution_matrix(outputs, ids, w)
    assert sim[0, 1] == pytest.approx(0.75, abs=1e-6) and sim[1, 0] == pytest.approx(0.0, abs=1e-6)


def test_far_worse_than_dropping_is_clipped_to_minus_one():
    outputs = torch.randn(2, 20, 4, generator=torch.Generator().manual_seed(11))
    outputs[1] = -3 * outputs[0]  # err[0, 1] = 16
    with pytest.warns(RuntimeWarning, match=r"expert\(s\) \[1\]"):  # only expert 0 is routed
        sim = substitution_matrix(outputs, torch.zeros(20, 1, dtype=torch.long), torch.ones(20, 1))
    assert sim[0, 1] == -1.0


def test_unrouted_expert_row_is_zero_with_a_warning():
    outputs, _, _ = case(4, 20, 5, 1, 12)
    ids = torch.tensor([[0, 1], [1, 2]] * 10)  # expert 3 never routed
    w = torch.full((20, 2), 0.5)
    with pytest.warns(RuntimeWarning, match=r"expert\(s\) \[3\]"):
        sim = substitution_matrix(outputs, ids, w)
    assert torch.equal(sim[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert (sim[:3, 3] != 0).all()  # as a candidate it was still measured


def test_router_weighting_counts_heavy_tokens_more():
    # Two tokens routed to 0; expert 1 equals 0 on the heavy one only: router weighting must
    # score it better than uniform weighting does.
    outputs = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(13))
    outputs[1, 0] = outputs[0, 0]
    outputs[0, 1] = outputs[0, 0]  # same norms, so only the weights differ
    outputs[1, 1] = -outputs[0, 0]
    ids = torch.tensor([[0], [0]])
    w = torch.tensor([[0.9], [0.1]])
    with pytest.warns(RuntimeWarning, match=r"expert\(s\) \[1\]"):  # only expert 0 is routed
        router, uniform = substitution_matrix(outputs, ids, w, "router"), substitution_matrix(outputs, ids, w, "uniform")
    assert router[0, 1] == pytest.approx(1 - 4 * 0.01 / 0.82, abs=1e-6)
    assert uniform[0, 1] == pytest.approx(-1.0, abs=1e-6)


def test_routed_weight_squares():
    ids = torch.tensor([[2, 0], [1, -1]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    want = torch.tensor([[0.0625, 0, 0.5625], [0, 0.25, 0]], dtype=torch.float64)
    assert torch.equal(routed_weight_squares(ids, w, 3), want)
    assert torch.equal(routed_weight_squares(ids, w, 3, "uniform"), (want > 0).double())


@pytest.mark.parametrize(
    "call,match",
    (
        (lambda: routed_weight_squares(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1), 4), "one shape"),
        (lambda: routed_weight_squares(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), 4, "square"), "weighting"),
        (lambda: SubstitutionAccumulator(4).update(torch.ones(4, 2, 3), torch.zeros(3, 1, dtype=torch.long),
                                                   torch.ones(3, 1)), "tokens = 3"),
        (lambda: SubstitutionAccumulator(4).result(), "no tokens"),
        (lambda: similarity_matrix(torch.ones(2, 3, 4), "substitution"), "top-k ids and weights"),
    ),
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------- model pass, command


@pytest.mark.slow
@pytest.mark.parametrize("arch", ("qwen2_moe", "deepseek_v2"))
def test_model_pass_uses_each_layers_inputs_and_routing(arch):
    model = build_tiny_model(arch, seed=1).eval()
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    result = calibrate_substitution(model, ids, batch_size=2, progress=False)
    captured = {}
    layers = find_moe_layers(model)

    def grab(index):
        def hook(module, args, kwargs):
            captured[index] = tuple(a.detach().reshape(-1, a.shape[-1]) for a in args[:3])
        return hook

    hooks = [layer.experts.register_forward_pre_hook(grab(layer.index), with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    assert result.tokens == 48 and sorted(result.matrices) == [layer.index for layer in layers]
    for layer in layers:
        x, top_ids, top_w = captured[layer.index]
        want = substitution_matrix(all_expert_outputs(layer, x), top_ids, top_w)
        torch.testing.assert_close(result.matrices[layer.index], want, rtol=0, atol=1e-5)


def test_existing_methods_refuse_substitution_and_calibrate_is_unchanged():
    assert METHODS[:3] == ("cka", "cosine", "frobenius") and "substitution" in METHODS
    model = build_tiny_model("qwen3_moe", seed=3).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="sere.calibration.substitution"):
        calibrate(model, ids, method="substitution", progress=False)


@pytest.mark.slow
def test_command_writes_an_asymmetric_artifact_and_says_the_method(tmp_path, capsys):
    from transformers import AutoConfig

    model_path = save_tiny(tmp_path / "m", "qwen3_moe")
    out = tmp_path / "out"
    rc = cli.main([
        "--model_path", str(model_path), "--output_path", str(out), "--similarity_method", "substitution",
        "--substitution_weighting", "uniform", "--max_tokens", "96", "--max_len", "32", "--batch_size", "2", "--no_progress",
    ])
    assert rc == 0, capsys.readouterr().err
    art = load_similarity(out, config=AutoConfig.from_pretrained(model_path))  # the loader accepts it
    meta = art.metadata
    assert (meta["method"], meta["weighting"], meta["value_range"], meta["kernel"]) == ("substitution", "uniform", "[-1, 1]", "none")
    assert int(meta["tokens"]) == 96
    for m in art.matrices.values():
        assert torch.equal(m.diagonal(), torch.ones(8)) and -1 <= m.min() and m.max() <= 1
        assert not torch.equal(m, m.T)  # asymmetric, and kept so
