"""The end-to-end bench's engine settings (bench/vllm_engine.py, bench/gpu/vllm_decode.py) without
starting an engine: which SERE settings each named engine runs, vLLM's keyword arguments (FP8,
additional_config) and the summary's lines for the fused variant."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import vllm_engine as e2e
from bench.gpu import vllm_decode


def test_every_engine_has_its_settings():
    assert e2e.sere_config("stock") is None
    assert e2e.sere_config("sere-s1") == {"select_top_k": 1, "threshold": 0.0}
    assert e2e.sere_config("sere-s1-fused") == {"select_top_k": 1, "threshold": 0.0, "fuse_topk": True}
    assert e2e.TIMED_ENGINES == ["stock", "sere-s1", "sere-s2", "sere-s1-fused"]
    with pytest.raises(ValueError, match="unknown engine 'sere-s3'.*sere-s1-fused"):
        e2e.sere_config("sere-s3")


def test_engine_kwargs_carry_quantization_and_sere():
    kw = e2e.engine_kwargs(Path("/m"), e2e.sere_config("sere-s1-fused"), eager=True, batches=[1, 4], smoke=True,
                           quantization="fp8")
    assert kw["quantization"] == "fp8" and kw["additional_config"] == {"sere": e2e.sere_config("sere-s1-fused")}
    plain = e2e.engine_kwargs(Path("/m"), None, eager=True, batches=[1, 4], smoke=True)
    assert "quantization" not in plain and "additional_config" not in plain


def test_parse_args_takes_quantization():
    args = e2e.parse_args(["--smoke", "--quantization", "fp8"])
    assert args.quantization == "fp8"
    assert e2e.parse_args(["--smoke"]).quantization is None


def test_each_model_gets_a_routing_that_routes_when_none_is_named():
    # DeepSeek-V2's dummy router collapses to the same experts for every token in bf16 (a run on
    # 2026-12-06 measured that by mistake through vllm_decode.py): the scripts and the pytest
    # level both default it to fp32 logits; a named routing wins.
    assert e2e.parse_args(["--model", "deepseek-v2-lite"]).routing == "model-fp32"
    assert e2e.parse_args(["--model", "qwen3-30b-a3b"]).routing == "model"
    assert e2e.parse_args(["--model", "deepseek-v2-lite", "--routing", "model"]).routing == "model"
    parser = vllm_decode.build_parser()
    assert e2e.parse_args(["--model", "deepseek-v2-lite"], parser).routing == "model-fp32"


def test_summary_lists_the_fused_engine_with_its_fused_layers():
    rows = lambda ms: [{"batch": 16, "step_ms": ms, "tokens_per_s": 16 / ms * 1e3}]  # noqa: E731
    results = {
        "stock": {"rows": rows(16.0)},
        "sere-s1": {"rows": rows(6.4), "sere": e2e.sere_config("sere-s1"), "rerouted_layers": 48,
                    "fused_topk_layers": 0, "backend": "numba", "start_s": 60.0},
        "sere-s1-fused": {"rows": rows(8.0), "sere": e2e.sere_config("sere-s1-fused"), "rerouted_layers": 48,
                          "fused_topk_layers": 48, "backend": "numba", "start_s": 61.0},
    }
    text = vllm_decode.summarize(results)
    assert "| sere-s1-fused | 16 | 8.000 | 2000 | 2.00x |" in text
    assert "sere-s1-fused: 48 layers re-routed, router top-k fused on 48" in text
    assert "sere-s1: 48 layers re-routed, backend numba" in text  # no fused clause where not asked
