"""The fused-MoE tile tuner's pure parts (bench/gpu/tune_fused_moe.py): the grid, vLLM's file
name and format, the choice of the best configuration and the table, on synthetic rows; and the
argument check, which needs no GPU."""
from __future__ import annotations

import json

import pytest

from bench.gpu import tune_fused_moe as tune


def row(T, setting, us, cfg=None, floor_us=10.0, experts=15):
    return dict(model="Qwen1.5-MoE-A2.7B", tokens=T, setting=setting, config=cfg, time_us=us,
                hbm_floor_us=floor_us, hbm_floor_share=None if us is None else round(floor_us / us, 3),
                experts_after=experts)


def test_grid_is_every_combination_with_split_k_one():
    grid = tune.config_grid({"BLOCK_SIZE_M": (16, 32), "BLOCK_SIZE_N": (64,), "num_stages": (3, 4, 5)})
    assert len(grid) == 6 and all(c["SPLIT_K"] == 1 for c in grid)
    assert len({json.dumps(c, sort_keys=True) for c in grid}) == 6
    assert len(tune.config_grid()) == 72


def test_config_file_name_is_vllms():
    # vLLM's get_config_file_name for unquantized experts: E, N (intermediate size), device with '_'
    assert tune.config_file_name(60, 1408, "NVIDIA H200") == "E=60,N=1408,device_name=NVIDIA_H200.json"
    assert tune.config_file_name(128, 768, "NVIDIA H100 80GB HBM3") == \
        "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"


def test_best_per_batch_takes_the_fastest_config_of_the_setting_only():
    a, b = {"BLOCK_SIZE_M": 16, "SPLIT_K": 1}, {"BLOCK_SIZE_M": 32, "SPLIT_K": 1}
    rows = [row(16, "S1-rho0", 50.0), row(16, "S1-rho0", 40.0, a), row(16, "S1-rho0", 30.0, b),
            row(16, "stock", 5.0, a), row(64, "S1-rho0", 60.0, a), dict(row(64, "S1-rho0", None, b), error="x")]
    best = tune.best_per_batch(rows, "S1-rho0")
    assert best[16]["config"] == b and best[64]["config"] == a  # vLLM's choice (config None) is no candidate
    assert tune.vllm_config_file(best) == {"16": b, "64": a}


def test_config_file_keeps_vllms_default_past_the_tuned_token_counts():
    """vLLM takes the nearest M's config: prefill chunks must not get the tiles tuned for decode."""
    a = {"BLOCK_SIZE_M": 16, "SPLIT_K": 1}
    best = {1: {"config": a}, 64: {"config": a}}
    content = tune.vllm_config_file(best, default_for=lambda m: {"BLOCK_SIZE_M": 64, "M": m})
    assert content["1"] == a and content["64"] == a
    assert [int(m) for m in content][2:] == [m for m in tune.UNTUNED_M if m > 64]
    assert content["2048"] == {"BLOCK_SIZE_M": 64, "M": 2048}


def test_markdown_compares_vllms_choice_with_the_best():
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1, "num_warps": 4,
           "num_stages": 4, "SPLIT_K": 1}
    text = tune.markdown([row(16, "stock", 20.0, experts=83), row(16, "S1-rho0", 50.0), row(16, "S1-rho0", 40.0, cfg)])
    assert "| 16 | S1-rho0 | 15 | 50.0 | 0.20 | 40.0 | 0.25 | 1.25x |" in text
    assert "| 16 | stock | 83 | 20.0 | 0.50 | - | - | - |" in text


def test_list_needs_no_gpu(capsys):
    assert tune.main(["--list", "--models", "Qwen3-30B-A3B", "--batches", "16,64"]) == 0
    assert "72 configurations x 2 batches x 2 settings" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tune.main(["--list", "--models", "mixtral"])
