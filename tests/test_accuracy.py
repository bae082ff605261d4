"""Accuracy-regression gate on the zoo's trained MoE models (marker `accuracy`).

    pytest -m accuracy tests/test_accuracy.py                     # compare with the goldens
    pytest -m accuracy tests/test_accuracy.py --update-goldens    # rewrite tests/zoo/goldens.json

The zoo (tests/zoo/<name>: trained on ten domains, calibrated with the project's command on a
mix of them; see tests/zoo/README.md) is measured against the unmodified model
(sere.harness.fidelity) at two fixed batch compositions (sere.harness.compositions) of the
committed held-out texts:
  MIXED     16 requests per decode step, four of each of kjv / pydoc / pycode / de;
  MINORITY  one code request (pycode) among 15 King James requests; its own KL and top-1
            agreement (row 0) are the minority metric, next to the same request batched with
            15 other code requests (MINORITY_ALONE).
It checks:
  - the metrics, the minority metric included, equal the committed goldens within TOLERANCES
    (both directions: a change for the better also needs an explicit --update-goldens);
  - the claim, at equal budget (every secondary slot moves: S=1 and a threshold below every
    similarity, so SERE and random re-routing activate the same experts per step): the best of
    the calibrated similarities (linear CKA, cosine, Frobenius, substitution) beats every one of
    RANDOM_SEEDS random draws on mean KL (MIXED) and on the minority request's KL (MINORITY);
    the paper's CKA alone is held to the same test, with a strict xfail where it was measured
    not to hold (CLAIM_FAILS_ON);
  - SERE beats top-1 truncation at equal budget; the gate fails with a shuffled similarity;
  - the models are real: per-domain held-out perplexity far below the text's own unigram model,
    routing that is not uniform and that depends on the domain; and they are small.
bench/results/accuracy.md has the full sweep (sere-accuracy-report).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sere.harness import compositions as comp
from sere.harness.fidelity import Composition, Tolerance, fidelity, gate_failures, reference_pass, setting_key
from sere.harness.settings import SERE_S1, SERE_S2

pytestmark = pytest.mark.accuracy

zoo = pytest.importorskip("sere.harness.zoo")
ZOO = zoo.zoo_dir()
GOLDENS = ZOO / "goldens.json"
# One batch of 16 windows of 32 tokens per composition, no greedy generation: each pass
# re-routes every decode step on its own (sere.harness.fidelity), the 12k vocabulary makes
# passes costly on a CPU, and the gate runs ~35 of them per model. The sweep
# (bench/results/accuracy.md) measures 128-token windows, 8 random seeds and greedy match.
SEQ_LEN, BATCH, NUM_BATCHES = 32, 16, 1
COMPOSITION = Composition(batch_size=BATCH, seq_len=SEQ_LEN, num_windows=BATCH * NUM_BATCHES)
MIXED_DOMAINS = ["kjv", "pydoc", "pycode", "de"]
MINORITY, MAJORITY = "pycode", "kjv"
PAPER_SETTINGS = (SERE_S2, SERE_S1)  # (S, rho) each
GATE_SETTINGS = [(m, S, rho) for S, rho in PAPER_SETTINGS for m in ("sere", "random")] + [
    ("truncate", *SERE_S1),
    ("oea", *SERE_S1),
]
# Equal budget for every similarity: S=1 and a threshold below any similarity value, so every
# secondary slot moves (for CKA, whose values are >= 0, the same as the paper's S=1, rho=0).
ALL_MOVE = (1, -1e9)
RANDOM_SEEDS = 4  # the gate's draws; the sweep takes 8
SIMILARITIES = ("cka", "cosine", "frobenius", "substitution")  # cka = the committed default artifact
TOLERANCES = {
    "kl": Tolerance(abs=1e-6, rel=2e-3),
    "top1_agreement": Tolerance(abs=2.5e-3),  # ~1 of the 496 scored positions
    "ppl_ratio": Tolerance(abs=5e-4),
    "experts_after": Tolerance(abs=0.01),
    "minority_kl": Tolerance(abs=1e-6, rel=2e-3),
    "minority_top1": Tolerance(abs=2e-2),  # 1 of the minority request's 31 positions is 0.032
}
MIXED_KEYS = ("kl", "top1_agreement", "ppl_ratio", "experts_after")
MINORITY_KEYS = ("minority_kl", "minority_top1", "experts_after")
# Where the claim was measured NOT to hold at equal budget (strict xfail: the day it holds the
# test says so), (model, "best" | "cka", composition) -> the numbers. Measured 2026-12-02, CPU
# float32, this zoo, the gate's compositions (32-token windows; the sweep's 128-token windows
# agree for CKA, and there the best similarity fails on qwen3_moe's minority request too but
# wins on its MIXED batches and on the upcycled model's: bench/results/accuracy.md).
CLAIM_FAILS_ON: dict[tuple[str, str, str], str] = {
    ("qwen3_moe", "best", "mixed"): "substitution KL 0.8131, random 0.7464..0.7892",
    ("qwen3_moe", "best", "minority"): "substitution KL 1.0580, random 1.0445..1.2363",
    ("qwen2_moe_upcycled", "best", "mixed"): "substitution KL 0.1279, random 0.1233..0.1349",
    ("qwen2_moe_upcycled", "best", "minority"): "cosine KL 0.2174, random 0.1929..0.2419",
    ("qwen2_moe", "cka", "mixed"): "KL 0.1972, random 0.1893..0.1934",
    ("qwen2_moe", "cka", "minority"): "KL 0.2973, random 0.2752..0.3559",
    ("deepseek_v2", "cka", "mixed"): "KL 0.2443, random 0.2164..0.2247",
    ("deepseek_v2", "cka", "minority"): "KL 0.4636, random 0.4072..0.4524",
    ("qwen3_moe", "cka", "mixed"): "KL 0.8711, random 0.7464..0.7892",
    ("qwen3_moe", "cka", "minority"): "KL 1.1967, random 1.0445..1.2363",
    ("qwen2_moe_upcycled", "cka", "mixed"): "KL 0.1315, random 0.1233..0.1349",
    ("qwen2_moe_upcycled", "cka", "minority"): "KL 0.2299, random 0.1929..0.2419",
}
# "Real model" thresholds (the cards in tests/zoo/<name>/README.md have the measured values).
MAX_PPL_VS_UNIGRAM = 1 / 3  # held-out perplexity at most a third of the text's own unigram model's
MIN_LOAD_ENTROPY = 0.75  # expert-load entropy / log E over all domains (low = collapsed)
MIN_DOMAIN_MI_BITS = 0.3  # mutual information between domain and chosen expert, per layer
MAX_CHECKPOINT_BYTES = 24 * 1024 * 1024


def _available():
    return [n for n in zoo.ZOO_MODELS if (ZOO / n / "sere_similarity.safetensors").exists()]


MODELS = _available()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ZooCase:
    """One zoo model with its stock reference passes, loaded once per session."""

    def __init__(self, name: str):
        from sere.artifact import load_similarity

        torch.manual_seed(0)
        self.name = name
        self.model, self.tokenizer = zoo.load_zoo_model(name)
        streams = {d: zoo.heldout_ids(self.tokenizer, domain=d) for d in {*MIXED_DOMAINS, MINORITY, MAJORITY}}
        pool = comp.window_pool(streams, SEQ_LEN)
        self.artifact = ZOO / name / "sere_similarity.safetensors"
        paths = {"cka": self.artifact, **{m: ZOO / name / f"similarity_{m}" / "sere_similarity.safetensors"
                                          for m in SIMILARITIES if m != "cka"}}
        self.similarities = {m: load_similarity(p, config=self.model.config).matrices for m, p in paths.items()}
        self.similarity = self.similarities["cka"]
        ref = lambda batches: reference_pass(self.model, batches, COMPOSITION, gen_len=1)  # noqa: E731 (no greedy: see SEQ_LEN)
        self.mixed = ref(comp.mixed(pool, MIXED_DOMAINS, BATCH, NUM_BATCHES))
        self.minority = ref(comp.minority(pool, MINORITY, MAJORITY, BATCH, NUM_BATCHES))
        self.minority_alone = ref(comp.minority_alone(pool, MINORITY, BATCH, NUM_BATCHES))
        self._metrics = None
        self._claims: dict = {}

    def run(self, ref, method, S, rho, similarity=None, greedy=False, **options):
        return fidelity(self.model, ref, self.similarity if similarity is None else similarity, select_top_k=S,
                        threshold=rho, method=method, method_options=options or None, greedy=greedy)

    def measure(self, similarity=None, settings=GATE_SETTINGS) -> dict[str, dict[str, float]]:
        """Gate metrics per setting: MIXED's means (greedy match included) and MINORITY's row 0."""
        out = {}
        for method, S, rho in settings:
            m = self.run(self.mixed, method, S, rho, similarity)
            row = {k: getattr(m, k) for k in MIXED_KEYS}
            mi = self.run(self.minority, method, S, rho, similarity)
            row.update(minority_kl=mi.kl_by_row[0], minority_top1=mi.top1_by_row[0])
            out[setting_key(method, S, rho)] = row
        return out

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        if self._metrics is None:
            self._metrics = self.measure()
        return self._metrics

    def claim(self, where: str) -> dict:
        """At ALL_MOVE: {"sims": {name: (kl, experts)}, "random": [(kl, experts)] x seeds} on
        MIXED (mean KL) or MINORITY (row 0's KL)."""
        if where not in self._claims:
            ref = self.mixed if where == "mixed" else self.minority

            def kl(m):
                return (m.kl if where == "mixed" else m.kl_by_row[0]), m.experts_after

            sims = {n: kl(self.run(ref, "sere", *ALL_MOVE, s)) for n, s in self.similarities.items()}
            rnd = [kl(self.run(ref, "random", *ALL_MOVE, seed=seed)) for seed in range(RANDOM_SEEDS)]
            self._claims[where] = {"sims": sims, "random": rnd}
        return self._claims[where]


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
        goldens["composition"] = {**vars(COMPOSITION), "mixed": MIXED_DOMAINS, "minority": [MINORITY, MAJORITY]}
        goldens["models"][case.name] = {
            "artifact_sha256": _sha256(case.artifact),
            "checkpoint_sha256": _sha256(ZOO / case.name / "model.safetensors"),
            "stock_experts": case.mixed.experts,
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
    assert case.mixed.experts == pytest.approx(gold["stock_experts"], abs=TOLERANCES["experts_after"].abs)
    failures = gate_failures(case.metrics, gold["settings"], TOLERANCES)
    assert not failures, f"{case.name}: accuracy regression vs tests/zoo/goldens.json:\n  " + "\n  ".join(failures)


def _beats_every_draw(claim: dict, sim: str) -> tuple[bool, str]:
    kl, experts = claim["sims"][sim]
    draws = [k for k, _ in claim["random"]]
    for _, e in claim["random"]:  # equal budget: the same slots move, so the same experts per step
        assert e == pytest.approx(experts, rel=0.03), (experts, claim["random"])
    return kl < min(draws), f"{sim} KL {kl:.4f}, random {min(draws):.4f}..{max(draws):.4f} ({len(draws)} seeds)"


@pytest.mark.parametrize("where", ["mixed", "minority"])
def test_best_similarity_beats_every_random_draw(case, where, request):
    known = CLAIM_FAILS_ON.get((case.name, "best", where))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"measured: {known}"))
    claim = case.claim(where)
    best = min(claim["sims"], key=lambda n: claim["sims"][n][0])
    ok, msg = _beats_every_draw(claim, best)
    print(f"{case.name} {where}: best {msg}")
    assert ok, f"{case.name} {where}: the best similarity does not beat every random draw: {msg}"


@pytest.mark.parametrize("where", ["mixed", "minority"])
def test_cka_beats_every_random_draw(case, where, request):
    known = CLAIM_FAILS_ON.get((case.name, "cka", where))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"measured: {known}"))
    ok, msg = _beats_every_draw(case.claim(where), "cka")
    print(f"{case.name} {where}: {msg}")
    assert ok, f"{case.name} {where}: {msg}"


def test_sere_beats_truncation_at_equal_budget(case):
    """At S=1, rho=0 SERE and top-1 truncation keep exactly the primary experts: SERE's moved
    slots must do better than dropping every secondary expert."""
    sere = case.metrics[setting_key("sere", *SERE_S1)]
    trunc = case.metrics[setting_key("truncate", *SERE_S1)]
    # the same primary set in the first MoE layer; later layers see other hidden states, so on
    # one batch of 32 positions their experts per step differ by up to ~3 %
    assert sere["experts_after"] == pytest.approx(trunc["experts_after"], rel=0.04)
    assert sere["kl"] < trunc["kl"] and sere["top1_agreement"] > trunc["top1_agreement"], (sere, trunc)
    assert sere["ppl_ratio"] < trunc["ppl_ratio"]


def test_minority_request_pays_for_its_company(case):
    """The minority request loses more among 15 requests of another domain than among its own:
    the cost the batch-level primary set puts on a lone request (reported, with numbers, in
    bench/results/accuracy.md)."""
    crowd = case.run(case.minority, "sere", *SERE_S1)
    alone = case.run(case.minority_alone, "sere", *SERE_S1)
    print(f"{case.name}: minority KL {crowd.kl_by_row[0]:.4f} among {MAJORITY}, {alone.kl_by_row[0]:.4f} among {MINORITY}")
    assert crowd.kl_by_row[0] > alone.kl_by_row[0]


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
    assert any(" minority_kl " in f for f in failures), f"{case.name}: the minority metric did not catch it ({failures})"


def test_zoo_model_is_real(case):
    card = json.loads((ZOO / case.name / "card.json").read_text())
    from sere.harness.zoo.evaluate import heldout_perplexity

    ids = zoo.heldout_ids(case.tokenizer, domain="pycode")
    assert heldout_perplexity(case.model, ids, 128) == pytest.approx(card["domains"]["pycode"]["ppl"], rel=1e-3), \
        "the card's perplexity is stale"
    for domain, d in card["domains"].items():
        assert d["ppl"] < MAX_PPL_VS_UNIGRAM * d["unigram_ppl"], f"{case.name} {domain}: {d}"
    for layer, r in card["routing"].items():
        assert r["load_entropy"] > MIN_LOAD_ENTROPY, f"{case.name} layer {layer}: routing collapsed onto few experts"
        assert r["domain_mi_bits"] > MIN_DOMAIN_MI_BITS, f"{case.name} layer {layer}: experts do not specialise by domain"


def test_zoo_is_small():
    sizes = {p.parent.name: p.stat().st_size for p in ZOO.glob("*/model.safetensors")}
    assert set(zoo.ZOO_MODELS) <= set(sizes)
    assert all(s <= MAX_CHECKPOINT_BYTES for s in sizes.values()), sizes
