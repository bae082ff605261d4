"""`sere-tune` (sere.harness.tune): end to end on a zoo model and on tiny random models of every
supported family, the JSON round trip through `sere.hf.enable(model, **json)` and the settings
parsers, the per-step transform against the runtime's, the search, and every bad input (a
one-line error, exit status 2, nothing written).

    pytest tests/test_tune.py -q

Runs are kept small (batch 8, windows of 32 tokens, 2 batches); the tool's defaults are larger.
Index letters: n = batches, B = batch, L = positions, T = tokens, k = experts per token, E = experts.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sere.hf
from sere.artifact import save_similarity
from sere.config import SereConfig
from sere.harness.fidelity import PerStepTransform
from sere.harness.model_configs import TINY_ARCHS, build_tiny_model
from sere.harness.tune import cli
from sere.harness.tune.data import (
    DataError,
    default_data_path,
    read_texts,
    token_stream,
    tune_windows,
)
from sere.harness.tune.measure import BatchMetrics, Measurement, Setting, StepwiseSere
from sere.harness.tune.search import PerLayerSearch, SearchError, ladder_of, parse_grid
from sere.harness.vllm_testing import save_random_similarity
from sere.harness.zoo import model_dir
from sere.transforms import get_transform
from sere.vllm.settings import read_settings
from tests.helpers import random_similarity, random_topk_ids

B, SEQ, NB = 8, 32, 2  # batch, window length, batches per batch size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ZOO_GRID = "S=1,2 rho=0,0.1,0.15,0.2,0.25,0.3,1.5"  # rho 1.5 is above every similarity: stock, KL 0
ZOO_BUDGET = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread is faster than two, and far faster on a
    busy machine (OpenMP threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zoo_model_dir() -> Path:
    return model_dir("qwen2_moe")


def zoo_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(zoo_model_dir())


def zoo_vocab() -> int:
    """The zoo tokenizer's vocabulary: the tiny models get one at least as large."""
    return len(load_tokenizer(zoo_model_dir()))


def run_tune(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv] + ["--no_progress"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def small_args(model, data, output, *extra):
    return ["--model_path", model, "--data_path", data, "--output_path", output, "--batch_size", B,
            "--seq_len", SEQ, "--num_batches", NB, *extra]


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    """A small jsonl ({"domain", "text"} lines) of real text: the calibration package's shipped
    KJV extract (committed, unlike the tuning sample, which may change)."""
    from sere.calibration.data import DEFAULT_DATA

    paragraphs = [p.strip() for p in DEFAULT_DATA.read_text().split("\n\n") if p.strip()]
    path = tmp_path_factory.mktemp("data") / "tune.jsonl"
    with open(path, "w") as f:
        for i, p in enumerate(paragraphs[:40]):
            f.write(json.dumps({"domain": ["prose", "verse"][i % 2], "text": p}) + "\n")
    return path


def vllm_config(additional):
    """A stand-in for vllm.config.VllmConfig (as tests/test_vllm_settings.py builds it)."""
    hf = SimpleNamespace(architectures=["Qwen2MoeForCausalLM"])
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf, model="/nowhere"), additional_config=additional)


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def decoded_logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    """[B, L-1, V] next-token log-probs, decoding the batch token by token with the KV cache:
    every forward is one real decode step of B tokens (what a server runs)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    past, out = None, []
    for t in range(batch.shape[1] - 1):
        o = model(input_ids=batch[:, t:t + 1], use_cache=True, **({key: past} if past is not None else {}))
        past = getattr(o, "cache", None) or o.past_key_values
        out.append(torch.log_softmax(o.logits[:, -1].float(), dim=-1))
    return torch.stack(out, dim=1)


def remeasured_kl(model_path: Path, tuning: dict, data_path: Path) -> dict[int, float]:
    """Mean KL(stock || SERE) per batch size with SERE loaded from the JSON through the hook."""
    meta = tuning["metadata"]
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    stream = token_stream(tokenizer, read_texts(data_path).texts, vocab_size=model.config.vocab_size)
    out = {}
    for batch_size in meta["batch_sizes"]:
        batches = tune_windows(stream, batch_size=batch_size, seq_len=meta["seq_len"], num_batches=meta["num_batches"])
        stock = [decoded_logprobs(model, b) for b in batches]
        with sere.hf.enable(model, **tuning):
            rerouted = [decoded_logprobs(model, b) for b in batches]
        kl = sum(float(torch.nn.functional.kl_div(r, s, reduction="sum", log_target=True))
                 for r, s in zip(rerouted, stock))
        out[batch_size] = kl / batches[:, :, 1:].numel()
    return out


# ---------------------------------------------------------------------------- the zoo model, end to end


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, text_jsonl):
    out_dir = tmp_path_factory.mktemp("zoo") / "tuned"
    argv = small_args(zoo_model_dir(), text_jsonl, out_dir, "--settings", ZOO_GRID, "--kl_budget", ZOO_BUDGET,
                      "--no_progress")
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(a) for a in argv])
    return SimpleNamespace(code=code, out=stdout.getvalue(), err=stderr.getvalue(), dir=out_dir,
                           tuning=json.loads((out_dir / cli.TUNING_FILENAME).read_text()),
                           results=json.loads((out_dir / cli.RESULTS_FILENAME).read_text()))


def test_zoo_run_writes_the_settings_the_table_and_the_plot(zoo_run):
    assert zoo_run.code == 0, zoo_run.err
    assert sorted(p.name for p in zoo_run.dir.iterdir()) == sorted(
        [cli.TUNING_FILENAME, cli.RESULTS_FILENAME, cli.PLOT_FILENAME])
    assert (zoo_run.dir / cli.PLOT_FILENAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for column in ("KL", "top-1", "ppl ratio", "experts stock", "experts SERE", "<- chosen"):
        assert column in zoo_run.out
    assert "chosen setting per MoE layer" in zoo_run.out and "per-layer search" in zoo_run.out
    # every grid setting was measured, with all the metrics
    grid = [m for m in zoo_run.results["measurements"] if m["stage"] == "grid"]
    assert len(grid) == 14
    for m in grid:
        pb = m["per_batch"][str(B)]
        assert 0 <= pb["top1_agreement"] <= 1 and pb["ppl_ratio"] > 0 and pb["kl"] >= 0
        assert pb["experts_after"] <= pb["experts_before"] + 1e-9


def test_zoo_choice_is_within_budget_and_no_worse_than_the_best_uniform(zoo_run):
    meta = zoo_run.tuning["metadata"]
    chosen, best = meta["measured"], meta["best_uniform"]
    assert chosen["kl"] <= ZOO_BUDGET and chosen["experts_share"] <= best["experts_share"]
    # the best uniform setting is the cheapest feasible grid point
    grid = [m for m in zoo_run.results["measurements"] if m["stage"] == "grid"]
    feasible = [m for m in grid if m["kl"] <= ZOO_BUDGET]
    assert best["experts_share"] == min(m["experts_share"] for m in feasible)
    # each kept per-layer step was measured as a whole setting within the budget
    for m in zoo_run.results["measurements"]:
        if m["stage"] == "per-layer" and m["label"] == zoo_run.results["chosen"]["label"]:
            assert m["kl"] <= ZOO_BUDGET


def test_zoo_metadata_says_what_was_measured_on_what(zoo_run, text_jsonl):
    import hashlib

    meta = zoo_run.tuning["metadata"]
    sim_file = zoo_model_dir() / "sere_similarity.safetensors"
    assert meta["similarity_sha256"] == hashlib.sha256(sim_file.read_bytes()).hexdigest()
    assert meta["data"]["sha256"] == hashlib.sha256(text_jsonl.read_bytes()).hexdigest()
    assert meta["model"]["model_type"] == "qwen2_moe" and meta["batch_sizes"] == [B]
    assert meta["kl_budget"] == ZOO_BUDGET and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["created"] and meta["search"] and meta["evaluations"] >= 10
    assert Path(zoo_run.tuning["similarity"]) == sim_file.resolve()


def test_zoo_json_is_accepted_unchanged_by_sereconfig_and_vllm_settings(zoo_run):
    tuning = zoo_run.tuning
    cfg = SereConfig.from_dict(tuning)
    vcfg = read_settings(vllm_config({"sere": tuning}))
    for c in (cfg, vcfg):
        assert c.select_top_k == tuning["select_top_k"] and c.threshold == tuning["threshold"]
        assert c.metadata == tuning["metadata"] and c.similarity == tuning["similarity"]
        for layer, over in tuning.get("layer_overrides", {}).items():
            got = c.for_layer(int(layer))
            assert got.select_top_k == over.get("select_top_k", tuning["select_top_k"])
            assert got.threshold == over.get("threshold", tuning["threshold"])
    assert cfg == vcfg  # metadata and source do not take part in comparisons


def test_zoo_json_through_the_hook_remeasures_within_budget(zoo_run, text_jsonl):
    """Loaded with sere.hf.enable(model, **json) and decoded token by token (real decode steps
    of B tokens, the hook re-routing each whole call), the chosen setting's KL is the tuned one."""
    kl = remeasured_kl(zoo_model_dir(), zoo_run.tuning, text_jsonl)
    tuned = zoo_run.tuning["metadata"]["measured"]["per_batch"]
    for batch_size, value in kl.items():
        assert value <= ZOO_BUDGET
        assert value == pytest.approx(tuned[str(batch_size)]["kl"], rel=1e-3, abs=1e-6)


def test_json_layer_keys_and_metadata_reach_the_hook(tmp_path):
    """JSON writes layer keys as strings; enable(model, **json) must read them as layers."""
    model = build_tiny_model("qwen2_moe", seed=0)
    sim_file = save_random_similarity(tmp_path, model.config, seed=0, low=0.0)
    tuning = json.loads(json.dumps({"select_top_k": 1, "threshold": 0.0, "layer_overrides": {"1": {"threshold": 2.0}},
                                    "similarity": str(sim_file), "metadata": {"tool": "sere-tune", "kl_budget": 0.1}}))
    with sere.hf.enable(model, **tuning) as handle:
        assert handle.rerouters[0].threshold == 0.0 and handle.rerouters[1].threshold == 2.0
        assert handle.config.metadata == tuning["metadata"]
        with torch.no_grad():
            model(torch.randint(0, 256, (2, 3)))


# ---------------------------------------------------------------------------- tiny models of every family


def save_tiny(arch: str, folder: Path, *, vocab_size: int | None = None, similarity: bool = True,
              tokenizer: bool = True) -> Path:
    """A tiny random `arch` model with the zoo's tokenizer (and a vocabulary to match) and a
    random similarity artifact of the right shape."""
    model = build_tiny_model(arch, seed=0, vocab_size=vocab_size or zoo_vocab())
    model.save_pretrained(str(folder))
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(zoo_model_dir() / name, folder / name)
    if similarity:
        save_random_similarity(folder, model.config, seed=1, low=0.0)
    return folder


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_end_to_end_and_round_trip(arch, tmp_path, text_jsonl, capsys):
    folder = save_tiny(arch, tmp_path / arch)
    out = tmp_path / "out"
    budget = 0.02
    code, stdout, err = run_tune(capsys, *small_args(folder, text_jsonl, out, "--settings", "S=1,2 rho=0,0.5,0.9",
                                                     "--kl_budget", budget, "--search_evals", 6))
    assert code == 0, err
    tuning = json.loads((out / cli.TUNING_FILENAME).read_text())
    assert tuning["metadata"]["measured"]["kl"] <= budget and tuning["metadata"]["model"]["model_type"] == arch
    assert read_settings(vllm_config({"sere": tuning})) == SereConfig.from_dict(tuning)
    kl = remeasured_kl(folder, tuning, text_jsonl)
    assert kl[B] <= budget
    assert kl[B] == pytest.approx(tuning["metadata"]["measured"]["kl"], rel=1e-3, abs=1e-6)


def test_without_matplotlib_the_plot_is_skipped_with_a_notice(tmp_path, text_jsonl, capsys, monkeypatch):
    import sere.harness.tune.plot as plot

    monkeypatch.setattr(plot, "matplotlib_available", lambda: False)
    folder = save_tiny("qwen3_moe", tmp_path / "m")
    out = tmp_path / "out"
    code, _, err = run_tune(capsys, *small_args(folder, text_jsonl, out, "--settings", "S=1 rho=0.9", "--kl_budget", 1,
                                                "--search_evals", 0))
    assert code == 0, err
    assert "matplotlib is not installed: no Pareto plot" in err
    assert sorted(p.name for p in out.iterdir()) == [cli.TUNING_FILENAME, cli.RESULTS_FILENAME]


def test_several_batch_sizes_must_each_meet_the_budget(tmp_path, text_jsonl, capsys):
    folder = save_tiny("mixtral", tmp_path / "m")
    out = tmp_path / "out"
    code, stdout, err = run_tune(capsys, "--model_path", folder, "--data_path", text_jsonl, "--output_path", out,
                                 "--batch_size", 2, 4, "--seq_len", 16, "--num_batches", 2,
                                 "--settings", "S=1 rho=0,0.5,0.9", "--kl_budget", 0.01, "--search_evals", 4)
    assert code == 0, err
    tuning = json.loads((out / cli.TUNING_FILENAME).read_text())
    per = tuning["metadata"]["measured"]["per_batch"]
    assert sorted(per) == ["2", "4"] and all(v["kl"] <= 0.01 for v in per.values())
    assert tuning["metadata"]["measured"]["kl"] == max(v["kl"] for v in per.values())


# ---------------------------------------------------------------------------- the per-step transform


@pytest.mark.parametrize("batch, steps, E, k, S, rho, invalid", [
    (1, 5, 8, 4, 1, 0.0, 0.0), (4, 7, 8, 4, 2, 0.3, 0.0), (16, 3, 60, 4, 1, 0.5, 0.1), (3, 4, 33, 8, 3, 0.2, 0.2),
    (2, 6, 8, 2, 1, 0.0, 0.0), (5, 2, 16, 4, 4, 0.0, 0.0), (5, 2, 16, 4, 0, 0.0, 0.0),
])
def test_stepwise_sere_equals_the_runtime_per_step(batch, steps, E, k, S, rho, invalid):
    rng = np.random.default_rng(batch * 100 + steps * 10 + E)
    for ties in (False, True):
        ids = random_topk_ids(rng, batch * steps, E, k, invalid_frac=invalid)  # T, k
        sim = random_similarity(rng, E, ties=ties)  # E, E
        want = PerStepTransform(get_transform("sere", backend="reference"), batch)(ids, sim, S, rho)
        got = StepwiseSere(batch)(ids, sim, S, rho)
        assert torch.equal(got, want) and got.dtype == ids.dtype


# ---------------------------------------------------------------------------- grid syntax and search


def test_grid_syntax():
    g = parse_grid("S=2,1; rho=0.4,0,0.2")
    assert g.select_top_k == (1, 2) and g.threshold == (0.0, 0.2, 0.4)
    assert parse_grid("select_top_k=1 threshold=0:0.3:0.1").threshold == (0.0, 0.1, 0.2, 0.3)
    assert parse_grid("rho=-1,0").select_top_k == (1,)
    assert [s.label() for s in parse_grid("S=1 rho=0.1").settings()] == ["S=1 rho=0.1"]


@pytest.mark.parametrize("text, match", [
    ("S=1", "needs rho"), ("S=0 rho=0", "positive integers"), ("S=1.5 rho=0", "positive integers"),
    ("rho=a", "cannot read rho"), ("alpha=1 rho=0", "cannot read 'alpha=1'"), ("rho=0 rho=1", "twice"),
    ("rho=1:0:0.1", "cannot read rho"), ("rho=nan", "no finite"),
])
def test_bad_grid_fails_clearly(text, match):
    with pytest.raises(SearchError, match=match):
        parse_grid(text)


def synthetic_evaluate(sensitivity: dict[int, float], ladder: list[tuple[int, float]]):
    """A stand-in measurement: rung r of the ladder (gentlest first) costs a layer r * its
    sensitivity in KL and saves it 10 % of its experts per rung; the setting adds up layers."""
    rung = {pair: i for i, pair in enumerate(ladder)}

    def evaluate(setting: Setting) -> Measurement:
        kl = share = 0.0
        for layer, w in sensitivity.items():
            r = rung[setting.of_layer(layer)]
            kl += w * r
            share += (1 - 0.1 * r) / len(sensitivity)
        pb = BatchMetrics(8, kl, 1.0, 1.0, 10.0, 10.0 * share)
        return Measurement(setting, {8: pb}, stage="per-layer")

    return evaluate


LADDER = [(2, 1.0), (2, 0.5), (2, 0.0), (1, 0.5), (1, 0.0)]  # gentlest first


def test_per_layer_search_goes_further_where_layers_tolerate_it():
    sensitivity = {0: 1.0, 1: 0.01, 2: 0.1}
    evaluate = synthetic_evaluate(sensitivity, LADDER)
    budget = 0.35
    start = evaluate(Setting(2, 1.0))  # the gentlest rung, KL 0
    search = PerLayerSearch(evaluate, [0, 1, 2], LADDER, budget, max_evals=100)
    best = search.run(start)
    assert best.kl <= budget and best.share < start.share
    rung = {layer: LADDER.index(best.setting.of_layer(layer)) for layer in sensitivity}
    assert rung[1] == 4 and rung[1] >= rung[2] >= rung[0]  # the least sensitive layer goes furthest
    assert best.setting.of_layer(1) == (1, 0.0)  # per-layer S too: the ladder crosses S
    assert all(m.kl <= budget for m in search.path) and search.evals <= 100
    shares = [m.share for m in search.path]
    assert shares == sorted(shares, reverse=True)  # every kept step saved experts


def test_per_layer_search_keeps_to_its_measurement_budget():
    evaluate = synthetic_evaluate({0: 0.01, 1: 0.01, 2: 0.01, 3: 0.01}, LADDER)
    search = PerLayerSearch(evaluate, [0, 1, 2, 3], LADDER, budget=1.0, max_evals=3)
    search.run(evaluate(Setting(2, 1.0)))
    assert search.evals == 3


def test_ladder_orders_the_grid_by_share_and_drops_plateaus():
    def m(S, rho, share, kl):
        return Measurement(Setting(S, rho), {8: BatchMetrics(8, kl, 1.0, 1.0, 10.0, 10.0 * share)})

    grid = [m(1, 0.0, 0.4, 0.5), m(1, 0.9, 1.0, 0.0), m(1, 0.8, 1.0, 0.0), m(2, 0.0, 0.7, 0.1), m(1, 0.2, 0.9, 0.2)]
    assert ladder_of(grid) == [(1, 0.9), (1, 0.2), (2, 0.0), (1, 0.0)]


def test_setting_json_form():
    s = Setting.per_layer({0: (2, 0.2), 1: (2, 0.0), 2: (2, 0.0), 3: (1, 0.0)})
    assert s.as_dict() == {"select_top_k": 2, "threshold": 0.0,
                           "layer_overrides": {"0": {"threshold": 0.2}, "3": {"select_top_k": 1}}}
    assert Setting.per_layer({0: (1, 0.3), 1: (1, 0.3)}) == Setting(1, 0.3) and Setting(1, 0.3).uniform
    cfg = SereConfig.from_dict(s.as_dict())
    assert [(cfg.for_layer(i).select_top_k, cfg.for_layer(i).threshold) for i in range(4)] == [
        (2, 0.2), (2, 0.0), (2, 0.0), (1, 0.0)]


# ---------------------------------------------------------------------------- data


def test_the_default_data_resolves_through_the_package():
    path = default_data_path()
    assert path.parts[-4:] == ("sere", "harness", "data", "tune_sample.jsonl")
    if not path.is_file():
        pytest.skip(f"the shipped sample {path} is not there yet")
    data = read_texts(None)
    assert data.texts and len({d for d in data.domains if d}) >= 2


def test_txt_jsonl_and_parquet_give_the_same_texts(tmp_path):
    texts = ["first text here", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"domain": "d", "text": t}) + "\n" for t in texts))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts, "domain": ["x"] * 3}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        assert read_texts(tmp_path / name).texts == texts


def test_parquet_without_pyarrow_or_pandas_names_the_missing_package(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(DataError, match="needs pyarrow or pandas.*pip install pyarrow"):
        read_texts(tmp_path / "a.parquet")


def test_windows_spread_over_the_stream():
    stream = torch.arange(1000)
    w = tune_windows(stream, batch_size=2, seq_len=10, num_batches=2)  # n=2, B=2, L=10
    assert w.shape == (2, 2, 10)
    starts = sorted(int(x) for x in w[:, :, 0].reshape(-1))
    assert starts[0] == 0 and starts[-1] == 990  # first and last window of the stream


# ---------------------------------------------------------------------------- bad input


def dense_model_folder(folder: Path) -> Path:
    import transformers as tf

    cfg = tf.Qwen2Config(vocab_size=zoo_vocab(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy(zoo_model_dir() / name, folder / name)
    return folder


def zoo_copy(folder: Path, *, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True)
    for p in zoo_model_dir().iterdir():
        if p.is_file() and (tokenizer or p.name not in TOKENIZER_FILES):
            (folder / p.name).symlink_to(p)
    return folder


def other_artifact(tmp_path: Path, *, experts: int | None = None, drop_last_layer: bool = False) -> Path:
    """An artifact for another model: another expert count, or one MoE layer short."""
    from sere.artifact import moe_layer_indices, num_experts_of

    cfg = zoo_config()
    layers = moe_layer_indices(cfg)[:-1] if drop_last_layer else moe_layer_indices(cfg)
    experts = experts or num_experts_of(cfg)
    gen = torch.Generator().manual_seed(0)
    return save_similarity(tmp_path / "other" / "sere_similarity.safetensors",
                           {i: torch.rand(experts, experts, generator=gen) for i in layers}, {"model_type": "qwen2_moe"})


BAD_INPUTS = {
    "no MoE router": (lambda t: ["--model_path", dense_model_folder(t / "dense")], "no supported MoE router in Qwen2ForCausalLM"),
    "artifact with another expert count": (
        lambda t: ["--similarity", other_artifact(t, experts=5)], "has 5 experts per layer, but the model has"),
    "artifact with other layers": (
        lambda t: ["--similarity", other_artifact(t, drop_last_layer=True)], r"missing MoE layers \[\d+\]"),
    "artifact missing": (lambda t: ["--similarity", t / "nothing.safetensors"], "similarity artifact not found"),
    "budget no setting meets": (
        lambda t: ["--settings", "S=1 rho=0", "--kl_budget", 1e-6],
        r"no setting meets --kl_budget 1e-06: the closest is S=1 rho=0 with KL [0-9.e-]+ \(batch 8: "),
    "empty text": (lambda t: ["--data_path", _write(t / "empty.txt", " \n\n  \n")], "contains no text"),
    "empty jsonl": (lambda t: ["--data_path", _write(t / "empty.jsonl", "")], "contains no text"),
    "too-short text": (lambda t: ["--data_path", _write(t / "short.txt", "In the beginning.")], "the tuning text is too short"),
    "missing tokenizer": (lambda t: ["--model_path", zoo_copy(t / "notok", tokenizer=False)], "no usable tokenizer in"),
    "tokenizer of another model": (
        lambda t: ["--model_path", save_tiny("olmoe", t / "small", vocab_size=256)], "the tokenizer is not this model's"),
    "bad grid": (lambda t: ["--settings", "S=1 rho=x"], "cannot read rho"),
    "only S >= k": (lambda t: ["--settings", f"S={zoo_config().num_experts_per_tok} rho=0"],
                    "no S below the model's .* experts per token"),
    "no model": (lambda t: ["--model_path", t / "nowhere"], "no model at --model_path"),
    "negative budget": (lambda t: ["--kl_budget", -1], "--kl_budget must be"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, text_jsonl, capsys):
    make, match = BAD_INPUTS[case]
    out_parent = tmp_path / "results"
    out_parent.mkdir()
    output = out_parent / "tuned"
    args = small_args(zoo_model_dir(), text_jsonl, output, "--settings", "S=1 rho=0,0.5", "--search_evals", 2)
    args += make(tmp_path)  # later flags win
    code, _, err = run_tune(capsys, *args)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sere-tune: error: ")
    assert re.search(match, last), last
    assert not output.exists() and list(out_parent.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_fails_clearly(tmp_path, capsys):
    code, _, err = run_tune(capsys, "--model_path", zoo_model_dir(), "--device", "cuda", "--output_path", tmp_path / "o")
    assert code == 2 and "torch sees no CUDA GPU" in err and not (tmp_path / "o").exists()


def test_a_failing_write_leaves_nothing(tmp_path):
    def boom(path):
        raise OSError("disk full")

    output = tmp_path / "a" / "b"
    with pytest.raises(OSError, match="disk full"):
        cli.write_outputs(output, {"x.json": lambda p: p.write_text("{}"), "y.png": boom})
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(OSError):
        cli.write_outputs(existing, {"x.json": lambda p: p.write_text("{}"), "y.png": boom})
    assert list(existing.iterdir()) == []


def test_output_path_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    f = _write(tmp_path / "file", "x")
    code, _, err = run_tune(capsys, "--model_path", zoo_model_dir(), "--output_path", f)
    assert code == 2 and "exists and is not a folder" in err and f.read_text() == "x"


def test_python_dash_m_entry_point(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "sere.harness.tune", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--kl_budget" in out.stdout and "--settings" in out.stdout

