"""Expert-similarity metrics: vectorised vs the pairwise loop, and constructed experts.

    pytest tests/test_calibration_metrics.py

Index letters: E = experts, N = tokens, D = hidden size.
"""
from __future__ import annotations

import pytest
import torch

from sere.calibration import cka
from sere.calibration.finalize import finalize_similarity
from sere.calibration.metrics import pairwise_similarity, similarity_matrix
from sere.calibration.pointwise import CosineAccumulator, FrobeniusAccumulator

METRICS = (
    ("cka", "linear"),
    ("cka", "rbf"),
    ("cka", "polynomial"),
    ("cosine", "linear"),
    ("frobenius", "linear"),
)
METRIC_IDS = [m if m != "cka" else f"cka-{k}" for m, k in METRICS]
# (E, N, D): one expert, two tokens, odd sizes, more features than tokens and the reverse.
SHAPES = ((1, 5, 3), (2, 2, 1), (5, 33, 7), (9, 17, 40), (3, 64, 2))
DTYPES = (torch.float32, torch.float64)
ATOL = {torch.float32: 2e-5, torch.float64: 1e-6}


def random_outputs(e: int, n: int, d: int, *, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, n, d, generator=g, dtype=torch.float64).to(dtype)  # E, N, D


def assert_valid_similarity(sim: torch.Tensor, e: int) -> None:
    assert sim.shape == (e, e) and sim.dtype == torch.float32
    assert torch.isfinite(sim).all()
    assert torch.equal(sim, sim.T)
    assert torch.equal(sim.diagonal(), torch.ones(e))
    assert sim.min() >= 0 and sim.max() <= 1


# ---------------------------------------------------------------------------- parity with the loop


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E%d-N%d-D%d" % s)
@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_vectorised_matches_pairwise_loop(method, kernel, shape, dtype):
    outputs = random_outputs(*shape, seed=sum(shape), dtype=dtype)
    sim = similarity_matrix(outputs, method, kernel)
    ref = pairwise_similarity(outputs.double(), method, kernel)
    assert_valid_similarity(sim, shape[0])
    torch.testing.assert_close(sim, ref, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_outputs_with_structure_match_pairwise_loop(method, kernel):
    # Experts that share components (not independent noise), so similarities spread over [0, 1].
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, 50, 6, generator=g, dtype=torch.float64)  # 3 sources
    mix = torch.rand(8, 3, generator=g, dtype=torch.float64)  # E, 3
    outputs = torch.einsum("es,snd->end", mix, base) + 0.3 * torch.randn(8, 50, 6, generator=g, dtype=torch.float64)
    sim = similarity_matrix(outputs, method, kernel)
    ref = pairwise_similarity(outputs, method, kernel)
    torch.testing.assert_close(sim, ref, atol=1e-6, rtol=0)
    assert sim.max() - sim.masked_fill(torch.eye(8, dtype=torch.bool), 1).min() > 0.1  # not a flat matrix


@pytest.mark.parametrize("kernel", cka.KERNELS)
def test_cka_small_blocks_match_one_block(kernel):
    outputs = random_outputs(6, 45, 5, seed=3)
    whole = cka.cka_matrix(outputs, kernel)
    blocked = cka.cka_matrix(outputs, kernel, block_elements=6 * 45 * 4)  # 4 token rows per block, ragged end
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", ((4, 30, 3), (4, 6, 30), (1, 9, 2)), ids=str)
def test_linear_hsic_gram_and_feature_forms_agree(shape):
    yc = cka.center_tokens(random_outputs(*shape, seed=1))
    gram = cka._gram_cross_hsic(yc, block_elements=37)
    feature = cka._feature_cross_hsic(yc, block_elements=shape[2] ** 2 * shape[0])  # one expert per step
    torch.testing.assert_close(gram, feature, rtol=1e-9, atol=1e-9)


def test_rbf_random_fourier_features_approximate_exact_rbf():
    outputs = random_outputs(4, 120, 3, seed=5)
    outputs[1] = outputs[0] + 0.2 * outputs[1]  # one clearly similar pair
    exact = cka.cka_matrix(outputs, "rbf")
    approx = cka.cka_matrix(outputs, "rbf", rbf_features=8192)
    torch.testing.assert_close(approx, exact, atol=0.03, rtol=0)
    ref = pairwise_similarity(outputs, "cka", "rbf", rbf_features=512)
    torch.testing.assert_close(cka.cka_matrix(outputs, "rbf", rbf_features=512), ref, atol=1e-6, rtol=0)


def test_rbf_bandwidth_on_many_tokens_uses_a_subsample(monkeypatch):
    outputs = random_outputs(2, 40, 3, seed=2)
    full = cka.rbf_sigma2(outputs)
    monkeypatch.setattr(cka, "RBF_MEDIAN_TOKENS", 10)
    sub = cka.rbf_sigma2(outputs)
    assert sub.shape == (2,) and not torch.equal(sub, full)
    torch.testing.assert_close(sub, cka.rbf_sigma2(outputs[:, torch.linspace(0, 39, 10).round().long()]))


# ---------------------------------------------------------------------------- constructed experts


@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_identical_experts_score_one(method, kernel):
    outputs = random_outputs(4, 60, 5, seed=11)
    outputs[2] = outputs[0]
    sim = similarity_matrix(outputs, method, kernel)
    assert sim[0, 2] == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 1] < 0.9


@pytest.mark.parametrize("kernel", cka.KERNELS)
@pytest.mark.parametrize("scale", (1e-3, 7.0))
def test_scaled_copy_has_cka_one(kernel, scale):
    outputs = random_outputs(3, 60, 5, seed=12)
    outputs[1] = scale * outputs[0]
    sim = cka.cka_matrix(outputs, kernel)
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 2] < 0.5


def test_scaled_copy_has_cosine_one_and_negated_copy_zero():
    outputs = random_outputs(3, 40, 6, seed=13)
    outputs[1] = 3.0 * outputs[0]
    outputs[2] = -outputs[0]
    sim = similarity_matrix(outputs, "cosine")
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert sim[0, 2] == pytest.approx(0.0, abs=1e-6)


# Independent random experts: CKA ~ D / (N + D) for linear, cosine ~ 0 -> 0.5 after mapping,
# Frobenius distances all about equal -> 1 - d / max close to 0.
UNRELATED_BOUNDS = {
    ("cka", "linear"): (0.0, 0.05),
    ("cka", "rbf"): (0.0, 0.1),
    ("cka", "polynomial"): (0.0, 0.1),
    ("cosine", "linear"): (0.45, 0.55),
    ("frobenius", "linear"): (0.0, 0.1),
}


@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_unrelated_random_experts_score_low(method, kernel):
    e = 6
    sim = similarity_matrix(random_outputs(e, 400, 4, seed=14), method, kernel)
    off = sim[~torch.eye(e, dtype=torch.bool)]
    lo, hi = UNRELATED_BOUNDS[(method, kernel)]
    assert lo <= off.min() and off.max() <= hi, off


@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_zero_and_constant_experts_give_valid_matrices(method, kernel):
    outputs = random_outputs(5, 30, 4, seed=15)
    outputs[1] = 0.0  # a dead expert
    outputs[3] = 2.5  # same output for every token
    sim = similarity_matrix(outputs, method, kernel)
    assert_valid_similarity(sim, 5)
    ref = pairwise_similarity(outputs, method, kernel)
    torch.testing.assert_close(sim, ref, atol=1e-6, rtol=0)
    if method == "cka":
        # No information in a constant output: no CKA with anything else.
        assert sim[1].sum() == 1.0 and sim[3].sum() == 1.0


@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_all_zero_layer_gives_valid_matrix(method, kernel):
    sim = similarity_matrix(torch.zeros(4, 10, 3), method, kernel)
    assert_valid_similarity(sim, 4)


def test_frobenius_of_equal_experts_is_all_ones():
    outputs = random_outputs(1, 10, 3).expand(4, 10, 3)
    assert torch.equal(similarity_matrix(outputs, "frobenius"), torch.ones(4, 4))


# ---------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("acc_cls", (CosineAccumulator, FrobeniusAccumulator), ids=lambda c: c.__name__)
def test_accumulating_batches_equals_one_pass(acc_cls):
    outputs = random_outputs(6, 50, 4, seed=16)
    one = acc_cls(6)
    one.update(outputs)
    parts = acc_cls(6, chunk_elements=6 * 4 * 3)  # 3 tokens per internal chunk as well
    for start, stop in ((0, 1), (1, 18), (18, 50)):
        parts.update(outputs[:, start:stop])
    assert parts.tokens == 50
    torch.testing.assert_close(parts.result(), one.result(), atol=1e-6, rtol=0)
    assert parts.gram.shape == (6, 6)  # the state does not grow with the data


# ---------------------------------------------------------------------------- bad input


def test_unknown_method_and_kernel_raise():
    outputs = random_outputs(2, 5, 3)
    with pytest.raises(ValueError, match="similarity method"):
        similarity_matrix(outputs, "euclid")
    with pytest.raises(ValueError, match="CKA kernel"):
        similarity_matrix(outputs, "cka", "sigmoid")


def test_cka_needs_two_tokens_and_3d_outputs():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        cka.cka_matrix(torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match=r"\[experts, tokens, hidden\]"):
        cka.cka_matrix(torch.randn(3, 4))


def test_accumulator_errors():
    acc = CosineAccumulator(4)
    with pytest.raises(ValueError, match="no tokens"):
        acc.result()
    with pytest.raises(ValueError, match=r"\[4, tokens, hidden\]"):
        acc.update(torch.randn(3, 2, 2))


def test_finalize_rejects_nan():
    with pytest.raises(FloatingPointError, match="non-finite"):
        finalize_similarity(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method,kernel", METRICS, ids=METRIC_IDS)
def test_cuda_matches_cpu_pairwise_loop(method, kernel):
    outputs = random_outputs(16, 300, 64, seed=17, dtype=torch.float32)
    sim = similarity_matrix(outputs.cuda(), method, kernel)
    assert sim.device.type == "cuda"
    ref = pairwise_similarity(outputs.double(), method, kernel)
    torch.testing.assert_close(sim.cpu(), ref, atol=1e-4, rtol=0)
