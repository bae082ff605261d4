"""Accuracy-regression gate on the zoo's trained MoE models (marker `accuracy`).

    pytest -m accuracy tests/test_accuracy.py                     # compare with the goldens
    pytest -m accuracy tests/test_accuracy.py --update-goldens    # rewrite tests/zoo/goldens.json

For each zoo model (tests/zoo/<name>: trained on the King James Bible, calibrated with the
project's calibration command), at one fixed batch composition (GATE_COMPOSITION: 64
held-out windows of 128 tokens, 16 sequences per decode step), the gate measures SERE and the
controls at the paper's settings against the unmodified model (sere.harness.fidelity) and checks:
  - the metrics equal the committed goldens within TOLERANCES (both directions: a change for
    the better also needs an explicit --update-goldens);
  - the claim: SERE's similarity beats random re-routing (same moved slots, same experts per
    step, random targets) on KL and top-1 agreement at S=2, rho=0.1 and S=1, rho=0 (where it
    was measured not to hold, a strict xfail: CLAIM_FAILS_ON), and SERE beats top-1
    truncation at equal budget;
  - the same claim with the substitution similarity (calibration/substitution.py) at equal
    budget (rho = -1, every secondary moves), where it holds on every model;
  - the gate has teeth: with the similarity matrix shuffled (experts relabelled) it fails;
  - the models are real (perplexity far below the unigram baseline, routing far from
    uniform) and small.
About a minute on 2 CPU cores. bench/results/accuracy.md has the full sweep (sere-accuracy-report).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sere.harness.fidelity import Composition, Tolerance, fidelity, gate_failures, reference_pass, setting_key
from sere.harness.settings import SERE_S1, SERE_S2

pytestmark = pytest.mark.accuracy

zoo = pytest.importorskip("sere.harness.zoo")
ZOO = zoo.zoo_dir()
GOLDENS = ZOO / "goldens.json"
GATE_COMPOSITION = Composition(batch_size=16, seq_len=128, num_windows=64)
PAPER_SETTINGS = (SERE_S2, SERE_S1)  # (S, rho) each; S=2 first, the order of the goldens' runs
# (method, S, rho): SERE and random at the paper's settings, the other controls at S=1
GATE_SETTINGS = [(m, S, rho) for S, rho in PAPER_SETTINGS for m in ("sere", "random")] + [
    ("truncate", *SERE_S1),
    ("oea", *SERE_S1),
]
# Stated tolerances. The metrics are deterministic on one machine; between 1 and 2 threads,
# and between transformers' eager and grouped_mm expert kernels, they were measured to move by
# < 3e-8 in KL and 2.6e-7 in perplexity ratio, and not at all in the discrete metrics (no router
# decision flipped). The margins below are far above that drift and far below what relabelling
# the similarity matrix moves (test_gate_fails_with_shuffled_similarity): on these models the
# choice of target moves KL by only 1-15 %, so a loose gate would not notice a broken similarity.
TOLERANCES = {
    "kl": Tolerance(abs=1e-6, rel=2e-3),
    "top1_agreement": Tolerance(abs=6e-4),  # ~5 of the 8,128 scored positions
    "ppl_ratio": Tolerance(abs=5e-4),
    "match_length": Tolerance(abs=0.1),  # one token of one of the 64 sequences is 0.016
    "experts_after": Tolerance(abs=0.01),
}
# Where the paper's claim (SERE's similarity beats random re-routing on KL and top-1) was
# measured NOT to hold on the zoo with the committed (linear CKA) artifacts; each becomes a
# strict xfail, so the day it holds the test says so. See bench/results/accuracy.md.
# Measured 2026-11-23 (CPU, float32, GATE_COMPOSITION) on the H100-trained zoo (bench/gpu/
# train_zoo.sh; the upcycled model included), SERE vs random (seed 0):
CLAIM_FAILS_ON: dict[tuple[str, int, float], str] = {
    ("qwen2_moe", 2, 0.1): "KL 0.0609 vs random 0.0572, top-1 0.8701 vs 0.8690",
    ("qwen2_moe", 1, 0.0): "KL 0.3361 vs random 0.3236, top-1 0.7064 vs 0.7058",
    ("deepseek_v2", 2, 0.1): "KL 0.0376 vs random 0.0372, top-1 0.8970 vs 0.8965",
    ("deepseek_v2", 1, 0.0): "KL 0.1830 vs random 0.1780, top-1 0.7692 vs 0.7784",
    ("qwen3_moe", 2, 0.1): "KL 0.3097 vs random 0.3023, top-1 0.7111 vs 0.7135",
    ("qwen3_moe", 1, 0.0): "KL 1.1670 vs random 1.1771, top-1 0.4476 vs 0.4515",
    ("qwen2_moe_upcycled", 2, 0.1): "KL 0.0216 vs random 0.0215, top-1 0.9154 vs 0.9203",
    ("qwen2_moe_upcycled", 1, 0.0): "KL 0.0891 vs random 0.0887, top-1 0.8271 vs 0.8246",
}
# "Real model" thresholds (the cards in tests/zoo/<name>/README.md have the measured values).
MAX_PPL_VS_UNIGRAM = 1 / 3  # held-out perplexity at most a third of the unigram baseline's
MAX_ROUTER_ENTROPY = 0.9  # mean per-token router entropy / log E (1.0 = uniform)
MIN_LOAD_ENTROPY = 0.8  # expert-load entropy / log E (low = collapsed onto a few experts)
MAX_CHECKPOINT_BYTES = 6 * 1024 * 1024
MAX_ZOO_BYTES = 20 * 1024 * 1024  # four models of <= 5 MB, their artifacts and logs


def _available():
    missing = [n for n in zoo.ZOO_MODELS if not (ZOO / n / "sere_similarity.safetensors").exists()]
    return [n for n in zoo.ZOO_MODELS if n not in missing]


MODELS = _available()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ZooCase:
    """One zoo model with its stock reference pass, loaded once per session."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.model, self.tokenizer = zoo.load_zoo_model(name)
        self.ids = zoo.heldout_ids(self.tokenizer)
        self.artifact = ZOO / name / "sere_similarity.safetensors"
        from sere.artifact import load_similarity

        self.similarity = load_similarity(self.artifact, config=self.model.config).matrices
        self.ref = reference_pass(self.model, self.ids, GATE_COMPOSITION)
        self._metrics = None

    def measure(self, similarity=None, settings=GATE_SETTINGS) -> dict[str, dict[str, float]]:
        out = {}
        for method, S, rho in settings:
            m = fidelity(self.model, self.ref, similarity or self.similarity, select_top_k=S, threshold=rho, method=method)
            out[setting_key(method, S, rho)] = {k: getattr(m, k) for k in TOLERANCES}
        return out

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        if self._metrics is None:
            self._metrics = self.measure()
        return self._metrics


_CASES: dict[str, ZooCase] = {}


@pytest.fixture(params=MODELS or [pytest.param(None, marks=pytest.mark.skip(reason="no calibrated zoo model in tests/zoo"))])
def case(request) -> ZooCase:
    if request.param not in _CASES:
        _CASES[request.param] = ZooCase(request.param)
    return _CASES[request.param]


def _load_goldens() -> dict:
    return json.loads(GOLDENS.read_text()) if GOLDENS.exists() else {"models": {}}


def test_metrics_match_goldens(case, request):
    if request.config.getoption("--update-goldens"):
        goldens = _load_goldens()
        goldens["composition"] = vars(GATE_COMPOSITION)
        goldens["models"][case.name] = {
            "artifact_sha256": _sha256(case.artifact),
            "checkpoint_sha256": _sha256(ZOO / case.name / "model.safetensors"),
            "stock_experts": case.ref.experts,
            "torch": torch.__version__,
            "settings": case.metrics,
        }
        GOLDENS.write_text(json.dumps(goldens, indent=1, sort_keys=True) + "\n")
        assert _load_goldens()["models"][case.name]["settings"] == json.loads(json.dumps(case.metrics))
        return
    gold = _load_goldens()["models"].get(case.name)
    assert gold is not None, f"no goldens for {case.name}: run `pytest -m accuracy --update-goldens {__file__}`"
    stale = [what for what, path in (("artifact", case.artifact), ("checkpoint", ZOO / case.name / "model.safetensors"))
             if gold[f"{what}_sha256"] != _sha256(path)]
    assert not stale, f"{case.name}: the {' and '.join(stale)} changed since the goldens were written; re-run with --update-goldens"
    assert case.ref.experts == pytest.approx(gold["stock_experts"], abs=TOLERANCES["experts_after"].abs)
    failures = gate_failures(case.metrics, gold["settings"], TOLERANCES)
    assert not failures, f"{case.name}: accuracy regression vs tests/zoo/goldens.json:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("S, rho", PAPER_SETTINGS)
def test_sere_beats_random_rerouting(case, S, rho, request):
    known = CLAIM_FAILS_ON.get((case.name, S, rho))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"measured: {known}"))
    sere = case.metrics[setting_key("sere", S, rho)]
    rnd = case.metrics[setting_key("random", S, rho)]
    # Same slots moved in the first MoE layer; later layers see different hidden states, so
    # their experts per step differ a little.
    assert sere["experts_after"] == pytest.approx(rnd["experts_after"], rel=0.02)
    assert sere["kl"] < rnd["kl"], f"{case.name} S={S} rho={rho}: SERE KL {sere['kl']:.5f} >= random {rnd['kl']:.5f}"
    assert sere["top1_agreement"] > rnd["top1_agreement"], (
        f"{case.name} S={S} rho={rho}: SERE top-1 {sere['top1_agreement']:.4f} <= random {rnd['top1_agreement']:.4f}"
    )


# The substitution similarity (calibration/substitution.py: how well expert i stands in for j
# on the tokens the router sends to j; asymmetric, in [-1, 1]) at rho = -1, where every secondary
# slot moves, as CKA's rho = 0 does. bench/results/substitution.md has the 8-seed comparison.
SUBSTITUTION_RHO = -1.0
# Where it was measured not to hold against random (seed 0), 2026-11-23, CPU float32: nowhere.
# KL is 6-21 % lower on every model and S; top-1 is higher everywhere, by 0.0002 (2 of 8,128
# positions) on qwen2_moe_upcycled at S=2, by 0.005-0.027 elsewhere.
SUBSTITUTION_FAILS_ON: dict[tuple[str, int], str] = {}


def _substitution_similarity(case: ZooCase) -> dict[int, torch.Tensor]:
    from sere.artifact import load_similarity

    path = ZOO / case.name / "similarity_substitution" / "sere_similarity.safetensors"
    if not path.exists():
        pytest.fail(f"{path} is missing: calibrate with --similarity_method substitution (bench/gpu/train_zoo.sh)")
    return load_similarity(path, config=case.model.config).matrices


@pytest.mark.parametrize("S", [S for S, _ in PAPER_SETTINGS])
def test_substitution_similarity_beats_random_rerouting(case, S, request):
    """The mechanism works when the similarity measures what re-routing does: at equal budget
    (same moved slots), SERE with the substitution similarity beats random targets on KL and
    top-1 agreement (the CKA default does not: test_sere_beats_random_rerouting)."""
    known = SUBSTITUTION_FAILS_ON.get((case.name, S))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"measured: {known}"))
    sim = _substitution_similarity(case)
    settings = [(m, S, SUBSTITUTION_RHO) for m in ("sere", "random")]
    got = case.measure(sim, settings)
    sere, rnd = (got[setting_key(m, S, SUBSTITUTION_RHO)] for m in ("sere", "random"))
    print(f"{case.name} S={S}: KL {sere['kl']:.4f} vs random {rnd['kl']:.4f}, "
          f"top-1 {sere['top1_agreement']:.4f} vs {rnd['top1_agreement']:.4f}")
    assert sere["experts_after"] == pytest.approx(rnd["experts_after"], rel=0.02)
    assert sere["kl"] < rnd["kl"], f"{case.name} S={S}: KL {sere['kl']:.5f} >= random {rnd['kl']:.5f}"
    assert sere["top1_agreement"] > rnd["top1_agreement"], (
        f"{case.name} S={S}: top-1 {sere['top1_agreement']:.4f} <= random {rnd['top1_agreement']:.4f}"
    )


def test_sere_beats_truncation_at_equal_budget(case):
    """At S=1, rho=0 SERE, top-1 truncation (and OEA, random) keep exactly the primary experts:
    SERE's moved slots must do better than dropping every secondary expert. (Against OEA and
    random the measured standing is reported in bench/results/accuracy.md, not asserted.)"""
    sere = case.metrics[setting_key("sere", *SERE_S1)]
    trunc = case.metrics[setting_key("truncate", *SERE_S1)]
    assert sere["experts_after"] == pytest.approx(trunc["experts_after"], rel=0.02)
    assert sere["kl"] < trunc["kl"] and sere["top1_agreement"] > trunc["top1_agreement"], (sere, trunc)
    assert sere["ppl_ratio"] < trunc["ppl_ratio"]


def test_gate_fails_with_shuffled_similarity(case):
    """Relabel the experts of every similarity matrix (rows and columns by one permutation):
    the artifact no longer describes the model, and the gate must say so."""
    gold = _load_goldens()["models"].get(case.name)
    if gold is None:
        pytest.fail(f"no goldens for {case.name}: run with --update-goldens first")
    g = torch.Generator().manual_seed(0)
    shuffled = {}
    for layer, sim in case.similarity.items():
        perm = torch.randperm(sim.shape[0], generator=g)
        shuffled[layer] = sim[perm][:, perm]
    settings = [("sere", S, rho) for S, rho in PAPER_SETTINGS]
    measured = case.measure(shuffled, settings)
    failures = gate_failures(measured, {k: gold["settings"][k] for k in measured}, TOLERANCES)
    failed = {f.split(":")[0] for f in failures}
    assert failed == {"sere"}, f"{case.name}: the gate did not catch a shuffled similarity matrix ({failures})"
    assert any(" kl " in f or " top1_agreement " in f for f in failures), failures


def test_zoo_model_is_real(case):
    card = json.loads((ZOO / case.name / "card.json").read_text())
    from sere.harness.zoo.evaluate import heldout_perplexity

    ppl = heldout_perplexity(case.model, case.ids, 128)
    assert ppl == pytest.approx(card["heldout_ppl"], rel=1e-3), "the card's perplexity is stale"
    assert ppl < MAX_PPL_VS_UNIGRAM * card["unigram_ppl"], f"{case.name}: perplexity {ppl:.1f} vs unigram {card['unigram_ppl']:.1f}"
    for layer, r in card["routing"].items():
        assert r["router_entropy"] < MAX_ROUTER_ENTROPY, f"{case.name} layer {layer}: near-uniform router"
        assert r["load_entropy"] > MIN_LOAD_ENTROPY, f"{case.name} layer {layer}: routing collapsed onto few experts"


def test_zoo_is_small():
    sizes = {p.name: p.stat().st_size for p in ZOO.glob("*/model.safetensors")}
    assert set(zoo.ZOO_MODELS) <= {p.parent.name for p in ZOO.glob("*/model.safetensors")}
    assert all(s <= MAX_CHECKPOINT_BYTES for s in sizes.values()), sizes
    total = sum(p.stat().st_size for p in ZOO.rglob("*") if p.is_file())
    assert total <= MAX_ZOO_BYTES, f"tests/zoo is {total / 2**20:.1f} MB"
