"""The zoo's own code (sere.zoo): text split, model definitions, training pieces, loading.

    pytest tests/test_zoo.py -q

No network: the Debian text is replaced by a synthetic `bible -f` listing; the committed
checkpoints are only loaded, never retrained.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from sere.zoo import ZOO_MODELS, heldout_ids, load_zoo_model, zoo_dir
from sere.zoo.data import HELDOUT_EVERY, HELDOUT_OFFSET, chapters, is_heldout, parse_verses, split_text
from sere.zoo.evaluate import unigram_perplexity, windows
from sere.zoo.models import MAX_CHECKPOINT_BYTES, build_model, count_parameters, zoo_config
from sere.zoo.train import _dump_log, lr_at, run_progress, training_loss

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


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_configs_have_the_features_sere_needs(name):
    cfg = zoo_config(name, vocab_size=2048)
    experts = getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    assert experts >= 32
    assert cfg.num_experts_per_tok == (8 if name == "qwen3_moe" else 4)
    if name == "qwen2_moe":
        assert cfg.shared_expert_intermediate_size > 0
    if name == "deepseek_v2":
        assert cfg.n_shared_experts >= 1 and cfg.first_k_dense_replace == 1
    assert not cfg.output_router_logits  # on in inference, transformers' generate fails with a mask
    assert count_parameters(build_model(name, vocab_size=2048)) * 2 <= MAX_CHECKPOINT_BYTES


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


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_committed_checkpoint_loads(name):
    model, tok = load_zoo_model(name)
    assert model.dtype == torch.float32 and not model.training
    assert len(tok) == model.config.vocab_size == 2048
    ids = heldout_ids(tok)
    assert ids.numel() == json.loads((zoo_dir() / name / "card.json").read_text())["heldout_tokens"]
    log = json.loads((zoo_dir() / name / "train_log.json").read_text())
    assert log["seed"] == 0 and log["steps_done"] > 1000 and len(log["curve"]) == log["steps_done"] // 10
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"] - 3  # it learned
