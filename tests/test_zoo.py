"""The zoo's own code (sere.harness.zoo): text split, model definitions, training pieces, loading.

    pytest tests/test_zoo.py -q

No network: the Debian text is replaced by a synthetic `bible -f` listing; the committed
checkpoints are only loaded, never retrained. The zoo folder is tests/zoo through SERE_ZOO_DIR,
which the root conftest.py sets.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from sere.harness.zoo import ZOO_MODELS, ZooDirNotSet, heldout_ids, heldout_text, load_zoo_model, model_dir, zoo_dir
from sere.harness.zoo.data import (
    HELDOUT_EVERY,
    HELDOUT_OFFSET,
    VALIDATION_EVERY,
    VALIDATION_OFFSET,
    chapters,
    is_heldout,
    parse_verses,
    split_text,
    split_validation,
)
from sere.harness.zoo.evaluate import unigram_perplexity, windows
from sere.harness.zoo.models import DENSE_MODELS, MAX_CHECKPOINT_BYTES, UPCYCLE_SHARDS, build_model, count_parameters, zoo_config
from sere.harness.zoo.train import _dump_log, ensure_experts_kernel, lr_at, run_progress, training_loss
from sere.harness.zoo.upcycle import shard_of, upcycle

GENESIS_CHAPTERS = 50


def _listing(n_chapters: int, verses: int = 2) -> str:
    books = [("Ge", GENESIS_CHAPTERS), ("Exo", 40), ("1Sm", 31)]
    lines, c = ["", "noise line"], 0
    for book, count in books:
        for ch in range(1, count + 1):
            for v in range(1, verses + 1):
                lines.append(f"{book}{ch}:{v} Verse {v} of chapter {c}.")
            c += 1
            if c == n_chapters:
                return "\n".join(lines)
    return "\n".join(lines)


def test_parse_and_split_by_whole_chapters():
    verses = parse_verses(_listing(121))
    assert len(verses) == 242 and verses[0].book == "Ge" and verses[-1].book == "1Sm"
    chs = chapters(verses)
    assert len(chs) == 121
    train, held, names = split_text(verses)
    held_idx = [i for i in range(121) if is_heldout(i)]
    assert held_idx == [HELDOUT_OFFSET] and not is_heldout(HELDOUT_OFFSET + 1)
    assert is_heldout(HELDOUT_OFFSET + HELDOUT_EVERY)
    assert names == ["Exo8"]
    assert "of chapter 57." in held and "of chapter 57." not in train
    assert held.count("\n\n") == 0 and train.count("\n\n") == 119  # chapters separated by blank lines


def test_no_genesis_chapter_is_held_out():
    # Genesis is the default calibration text: calibration must never see held-out text.
    assert not any(is_heldout(c) for c in range(GENESIS_CHAPTERS))


def test_validation_split_takes_whole_training_chapters():
    train, _, _ = split_text(parse_verses(_listing(121)))  # 120 training chapters
    fit, val = split_validation(train)
    assert VALIDATION_OFFSET >= GENESIS_CHAPTERS  # Genesis stays in training (calibration text)
    assert val == "Verse 1 of chapter 61.\nVerse 2 of chapter 61.\n"  # training chapter 60 = chapter 61 (57 is held out)
    assert "of chapter 61." not in fit and fit.count("\n\n") == 118
    with pytest.raises(ValueError, match="none for validation"):
        split_validation("a\n\nb\n")
    assert VALIDATION_EVERY > 1


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_configs_have_the_features_sere_needs(name):
    cfg = zoo_config(name, vocab_size=12288)
    experts = getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    # the proportions of the real models: Qwen1.5-MoE 60 x top-4 + shared, DeepSeek-V2-Lite
    # 64 x top-6 + 2 shared after a dense layer, Qwen3-30B-A3B 128 x top-8
    want = {"qwen2_moe": (60, 4), "qwen2_moe_upcycled": (60, 4), "deepseek_v2": (64, 6), "qwen3_moe": (128, 8)}[name]
    assert (experts, cfg.num_experts_per_tok) == want
    if name.startswith("qwen2_moe"):
        assert cfg.shared_expert_intermediate_size > 0
    if name == "deepseek_v2":
        assert cfg.n_shared_experts == 2 and cfg.first_k_dense_replace == 1
    assert not cfg.output_router_logits  # on in inference, transformers' generate fails with a mask
    import torch as _torch

    with _torch.device("meta"):  # size only: no need to initialise 11 M weights
        n = count_parameters(build_model(name, vocab_size=12288))
    assert n * 2 <= MAX_CHECKPOINT_BYTES == 24 * 1024 * 1024


def test_upcycled_model_has_qwen2_moe_config_and_a_dense_source():
    assert zoo_config("qwen2_moe_upcycled", vocab_size=64).to_dict() == zoo_config("qwen2_moe", vocab_size=64).to_dict()
    dense = zoo_config(DENSE_MODELS[0], vocab_size=64)
    moe = zoo_config("qwen2_moe_upcycled", vocab_size=64)
    assert dense.model_type == "qwen2" and not hasattr(dense, "router_aux_loss_coef")
    assert dense.intermediate_size == UPCYCLE_SHARDS * moe.moe_intermediate_size == moe.shared_expert_intermediate_size


def test_unknown_zoo_model_is_an_error():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo_config("mixtral", vocab_size=16)


def test_learning_rate_schedule():
    peak = 4e-3
    assert lr_at(0.0, warmup=0.05, peak=peak) < peak / 10
    assert lr_at(0.05, warmup=0.05, peak=peak) == pytest.approx(peak)
    assert lr_at(1.0, warmup=0.05, peak=peak) == pytest.approx(0.1 * peak)
    assert lr_at(0.5, warmup=0.05, peak=peak) < lr_at(0.3, warmup=0.05, peak=peak)


def test_progress_follows_steps_or_time_whichever_is_ahead():
    assert run_progress(100, 1000, elapsed_s=0.0, max_minutes=math.inf) == 0.1
    assert run_progress(100, 1000, elapsed_s=180.0, max_minutes=6.0) == 0.5  # time binds
    assert run_progress(900, 1000, elapsed_s=180.0, max_minutes=6.0) == 0.9  # steps bind
    assert run_progress(10, 1000, elapsed_s=999.0, max_minutes=6.0) == 1.0


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v2"])
def test_training_loss_includes_load_balancing(name):
    model = build_model(name, vocab_size=64, seed=0)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss, lm, aux = training_loss(model, x)
    coef = model.config.router_aux_loss_coef
    assert aux > 0 and math.isfinite(lm)
    # DeepSeek-V2 returns no aux loss of its own: the script adds it, like Qwen2-MoE does itself
    assert float(loss.detach()) == pytest.approx(lm + coef * aux, rel=1e-5)
    loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_log_keeps_one_line_per_curve_point():
    log = {"model": "m", "curve": [{"step": 9, "loss": 3.0}, {"step": 19, "loss": 2.5}]}
    text = _dump_log(log)
    assert json.loads(text) == log
    assert '  {"step": 19, "loss": 2.5}' in text.splitlines()


def test_windows_and_unigram_baseline():
    assert windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="no window"):
        windows(torch.arange(2), 3)
    V = 16
    uniform = torch.arange(V).repeat(50)  # every token equally often: the baseline is V
    assert unigram_perplexity(uniform, torch.arange(V), V) == pytest.approx(V)


# ---- upcycling (sere.harness.zoo.upcycle) ----------------------------------------------------------


@pytest.fixture(scope="module")
def dense():
    return build_model("qwen2_dense", vocab_size=64, seed=1).eval()


def _upcycled(dense, **kw):
    return upcycle(dense, zoo_config("qwen2_moe_upcycled", vocab_size=64), seed=3, **kw).eval()


def _expert_neurons(moe, layer: int, e: int) -> torch.Tensor:
    """Expert e's neurons as rows [gate | up | down^T]: I, 3H."""
    ex = moe.model.layers[layer].mlp.experts
    I = ex.down_proj.shape[-1]
    return torch.cat([ex.gate_up_proj[e, :I], ex.gate_up_proj[e, I:], ex.down_proj[e].T], dim=1)  # I, 3H


def _shard_neurons(dense, layer: int, s: int, I: int) -> torch.Tensor:
    mlp = dense.model.layers[layer].mlp
    rows = slice(s * I, (s + 1) * I)
    return torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows], mlp.down_proj.weight[:, rows].T], dim=1)


# Experts picking one copy of every shard (expert e is shard e mod 4): first copies, last copies, mixed.
ONE_COPY_OF_EACH_SHARD = ([0, 1, 2, 3], [28, 29, 30, 31], [4, 13, 2, 31])


@pytest.mark.parametrize("shuffle", [False, True])
def test_unperturbed_upcycle_reproduces_the_dense_ffn(dense, shuffle):
    moe = _upcycled(dense, reinit_fraction=0.0, shuffle=shuffle)
    x = torch.randn(7, dense.config.hidden_size, generator=torch.Generator().manual_seed(0))  # T, H
    for layer in (0, 2):
        want = dense.model.layers[layer].mlp(x)  # T, H
        mlp = moe.model.layers[layer].mlp
        torch.testing.assert_close(mlp.shared_expert(x), want)
        for experts in ONE_COPY_OF_EACH_SHARD:
            ids = torch.tensor([experts] * 7)  # T, k
            torch.testing.assert_close(mlp.experts(x, ids, torch.ones(7, 4)), want, atol=1e-6, rtol=1e-5)
        # Two copies of one shard are not the whole FFN.
        ids = torch.tensor([[0, 4, 2, 3]] * 7)
        assert (mlp.experts(x, ids, torch.ones(7, 4)) - want).abs().max() > 1e-3


def test_upcycle_copies_everything_but_the_ffn_and_leaves_the_router_fresh(dense):
    moe = _upcycled(dense)
    ms = moe.state_dict()
    copied = [k for k in dense.state_dict() if ".mlp." not in k]
    assert any("self_attn.q_proj.bias" in k for k in copied) and "model.embed_tokens.weight" in copied
    for key in copied:
        assert torch.equal(ms[key], dense.state_dict()[key]), key
    for layer in moe.model.layers:
        assert torch.all(layer.mlp.shared_expert_gate.weight == 0)  # sigmoid gate 0.5 at the start
        assert layer.mlp.gate.weight.std() > 0  # a fresh router, not zeros
    assert count_parameters(moe) == count_parameters(build_model("qwen2_moe", vocab_size=64))
    assert upcycle(dense, zoo_config("qwen2_moe_upcycled", vocab_size=64)).training  # ready to train


def test_each_copy_keeps_a_shuffled_half_of_its_shard(dense):
    moe = _upcycled(dense, reinit_fraction=0.5)
    I = moe.config.moe_intermediate_size
    for e in (0, 5, 31):
        shard = _shard_neurons(dense, 1, shard_of(e, UPCYCLE_SHARDS), I)  # I, 3H
        mine = _expert_neurons(moe, 1, e)  # I, 3H
        match = (mine[:, None, :] == shard[None, :, :]).all(-1)  # I, I: expert neuron i is shard neuron j
        assert match.sum(1).max() == 1 and match.sum() == I // 2, f"expert {e}"
        assert not match[: I // 2].any()  # the re-initialised neurons come first
    # Copies of one shard differ (own permutation, own re-initialisation) but share some neurons.
    a, b = _expert_neurons(moe, 1, 0), _expert_neurons(moe, 1, 4)
    assert not torch.equal(a, b)
    assert (a[:, None, :] == b[None, :, :]).all(-1).any()


def test_upcycle_is_deterministic_and_checks_shapes(dense):
    one, two = _upcycled(dense), _upcycled(dense)
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters()))
    wrong = zoo_config("qwen2_moe_upcycled", vocab_size=64)
    wrong.moe_intermediate_size = 40
    with pytest.raises(ValueError, match="shards x expert intermediate"):
        upcycle(dense, wrong)
    with pytest.raises(ValueError, match="reinit_fraction"):
        upcycle(dense, zoo_config("qwen2_moe_upcycled", vocab_size=64), reinit_fraction=1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        upcycle(dense, zoo_config("qwen2_moe_upcycled", vocab_size=128))


def test_dense_training_loss_has_no_balance_term():
    model = build_model("qwen2_dense", vocab_size=64, seed=0)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    loss, lm, aux = training_loss(model, x)
    assert aux == 0.0 and float(loss.detach()) == pytest.approx(lm)
    assert ensure_experts_kernel(model, x) == "dense"


def test_expert_kernel_probe_falls_back_to_eager(monkeypatch):
    import sere.harness.zoo.train as train_module

    moe = build_model("qwen2_moe", vocab_size=64, seed=0)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def no_kernel(model, x):
        raise RuntimeError("grouped_mm has no float32 kernel here")

    monkeypatch.setattr(train_module, "training_loss", no_kernel)
    assert train_module.ensure_experts_kernel(moe, x) == "eager"
    assert moe.config._experts_implementation == "eager"


@pytest.mark.slow
def test_expert_kernel_probe_keeps_a_working_kernel_and_no_gradient():
    moe = build_model("qwen2_moe", vocab_size=64, seed=0)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    configured = moe.config._experts_implementation
    assert ensure_experts_kernel(moe, x) == configured != "eager"
    assert all(p.grad is None for p in moe.parameters())  # the probe leaves no gradient behind


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_committed_checkpoint_loads(name):
    model, tok = load_zoo_model(name)
    assert model.dtype == torch.float32 and not model.training
    assert len(tok) == model.config.vocab_size == 12288
    card = json.loads((zoo_dir() / name / "card.json").read_text())
    assert heldout_ids(tok, domain="pycode").numel() == card["domains"]["pycode"]["tokens"]
    log = json.loads((zoo_dir() / name / "train_log.json").read_text())
    assert log["seed"] == 0 and log["steps_done"] > 1000 and len(log["curve"]) == log["steps_done"] // log["args"]["log_every"]
    assert log["tokens_seen"] > 3 * 13_107_200  # several times the first (KJV-only) zoo's 1600 x 64 x 128 tokens
    assert log["precision"].startswith("bf16") and set(log["train_tokens_per_domain"]) == set(card["domains"]) - {"en_fortunes"}
    assert log["saved_step"] in {e["step"] for e in log["heldout_evals"]}
    assert min(e["val_ppl"] for e in log["heldout_evals"]) == log["best_val_ppl"]  # the best evaluation was kept
    if "upcycle" in log:  # it starts from a trained dense model: its first evaluation is already close to it
        dense_log = log["upcycle"]["dense_log"]
        assert dense_log["model"] == "qwen2_dense" and dense_log["steps_done"] > 1000
        committed = json.loads((zoo_dir() / name / "dense_train_log.json").read_text())
        assert {k: v for k, v in committed.items() if k != "curve"} == dense_log
        assert log["heldout_evals"][0]["val_ppl"] < 1.25 * dense_log["best_val_ppl"]
        assert log["upcycle"]["reinit_fraction"] == 0.5 and log["upcycle"]["n_shards"] == 4
    else:
        assert log["curve"][-1]["loss"] < log["curve"][0]["loss"] - 3  # it learned


# ---- where the zoo is: an argument or SERE_ZOO_DIR, never a path of the checkout -------------------


def test_zoo_dir_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SERE_ZOO_DIR", str(tmp_path / "env"))
    assert zoo_dir() == tmp_path / "env"
    assert zoo_dir(tmp_path / "arg") == zoo_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_no_zoo_dir_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SERE_ZOO_DIR", raising=False)
    for call in (zoo_dir, lambda: model_dir("qwen2_moe"), heldout_text):
        with pytest.raises(ZooDirNotSet, match=r"^no zoo folder: pass --zoo-dir or set SERE_ZOO_DIR \(this repository's is tests/zoo\)$"):
            call()


def test_model_dir_in_an_explicit_zoo(tmp_path, monkeypatch):
    monkeypatch.delenv("SERE_ZOO_DIR", raising=False)
    (tmp_path / "qwen2_moe").mkdir()
    (tmp_path / "qwen2_moe" / "config.json").write_text("{}")
    assert model_dir("qwen2_moe", tmp_path) == tmp_path / "qwen2_moe"
    with pytest.raises(FileNotFoundError, match="--zoo-dir"):
        model_dir("qwen3_moe", tmp_path)


def test_committed_checkpoint_loads_from_an_explicit_zoo_dir(monkeypatch):
    committed = zoo_dir()
    monkeypatch.delenv("SERE_ZOO_DIR", raising=False)
    model, tok = load_zoo_model("qwen2_moe", zoo_dir=committed)
    assert not model.training
    card = json.loads((committed / "qwen2_moe" / "card.json").read_text())
    assert heldout_ids(tok, committed, domain="kjv").numel() == card["domains"]["kjv"]["tokens"]


def test_train_command_needs_out_or_a_zoo_folder(tmp_path, monkeypatch, capsys):
    from sere.harness.zoo.train import output_dir, parse_args

    monkeypatch.delenv("SERE_ZOO_DIR", raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "qwen2_moe"])
    assert exc.value.code == 2
    assert "no zoo folder: pass --zoo-dir or set SERE_ZOO_DIR" in capsys.readouterr().err.splitlines()[-1]
    assert output_dir(parse_args(["--model", "qwen2_moe", "--zoo-dir", str(tmp_path)])) == tmp_path / "qwen2_moe"
    assert output_dir(parse_args(["--model", "qwen2_moe", "--out", str(tmp_path / "o")])) == tmp_path / "o"
    monkeypatch.setenv("SERE_ZOO_DIR", str(tmp_path / "env"))
    assert output_dir(parse_args(["--model", "qwen3_moe"])) == tmp_path / "env" / "qwen3_moe"


def test_card_command_needs_a_zoo_folder(monkeypatch, capsys):
    from sere.harness.zoo.card import main

    monkeypatch.delenv("SERE_ZOO_DIR", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "qwen2_moe"])
    assert exc.value.code == 2 and "pass --zoo-dir or set SERE_ZOO_DIR" in capsys.readouterr().err


# ---- the multi-domain training data and the routing-specialisation numbers ---------------------


def test_mixed_batches_draw_domains_uniformly_and_stay_inside_each_stream():
    from sere.harness.zoo.tokens import sample_mixed_batch

    streams = [torch.full((1000,), 1), torch.full((50_000,), 2), torch.full((300,), 3)]  # sizes differ 170x
    x = sample_mixed_batch(streams, batch=3000, seq_len=64, gen=torch.Generator().manual_seed(0))
    assert x.shape == (3000, 64) and bool((x == x[:, :1]).all())  # a window never crosses into another stream
    share = torch.bincount(x[:, 0], minlength=4)[1:].float() / 3000
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.04), share  # uniform over domains, not by size
    with pytest.raises(ValueError, match="no window of 400"):
        sample_mixed_batch(streams, batch=2, seq_len=400, gen=torch.Generator())


def test_token_streams_load_by_split(tmp_path):
    import numpy as np

    from sere.harness.zoo.tokens import load_streams, mean_perplexity

    (tmp_path / "tokens" / "train").mkdir(parents=True)
    np.save(tmp_path / "tokens" / "train" / "kjv.npy", np.arange(10, dtype=np.uint16))
    got = load_streams(tmp_path, "train")
    assert list(got) == ["kjv"] and got["kjv"].dtype == torch.int64 and got["kjv"].tolist() == list(range(10))
    with pytest.raises(FileNotFoundError, match="sere.harness.zoo.corpus"):
        load_streams(tmp_path, "validation")
    with pytest.raises(ValueError, match="unknown split"):
        load_streams(tmp_path, "test")
    assert mean_perplexity({"a": 10.0, "b": 40.0}) == pytest.approx(20.0)


def test_domain_expert_information_bounds():
    from sere.harness.zoo.evaluate import domain_expert_information, text_unigram_perplexity

    same = domain_expert_information({"a": torch.tensor([5.0, 5, 0, 0]), "b": torch.tensor([1.0, 1, 0, 0])})
    assert same["mi_bits"] == pytest.approx(0.0, abs=1e-12)  # both domains route alike
    apart = domain_expert_information({"a": torch.tensor([5.0, 5, 0, 0]), "b": torch.tensor([0.0, 0, 2, 2])})
    assert apart["mi_bits"] == pytest.approx(1.0) == apart["max_bits"]  # the expert names the domain
    assert apart["domain_load_entropy"] == pytest.approx(0.5)  # 2 of 4 experts within a domain
    assert text_unigram_perplexity(torch.tensor([0, 1, 2, 3])) == pytest.approx(4.0)
    assert text_unigram_perplexity(torch.tensor([7, 7, 7])) == pytest.approx(1.0)


def test_calibration_pieces_keep_whole_lines_and_reach_every_line():
    from sere.harness.zoo.calib_text import pieces

    text = "".join(f"line {i:03d}\n" for i in range(100))  # 9 characters a line
    got = pieces(text, chars=40)
    assert all(len(p) >= 40 and p.endswith("\n") for p in got)
    assert "".join(got) == text[: len("".join(got))] and len(text) - len("".join(got)) < 40  # only a short tail is left
