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
    assert e2e.sere_config("sere-s1-merge") == {"select_top_k": 1, "threshold": 0.0, "merge_slots": True}
    assert e2e.sere_config("sere-s1-nomerge") == {"select_top_k": 1, "threshold": 0.0, "merge_slots": False}
    assert e2e.TIMED_ENGINES == ["stock", "sere-s1", "sere-s2", "sere-s1-fused", "sere-s1-merge", "sere-s1-nomerge"]
    with pytest.raises(ValueError, match="unknown engine 'sere-s3'.*sere-s1-fused"):
        e2e.sere_config("sere-s3")


def test_engine_kwargs_carry_quantization_and_sere():
    kw = e2e.engine_kwargs(Path("/m"), e2e.sere_config("sere-s1-fused"), eager=True, batches=[1, 4], smoke=True,
                           quantization="fp8_per_block")
    assert kw["quantization"] == "fp8_per_block" and kw["additional_config"] == {"sere": e2e.sere_config("sere-s1-fused")}
    assert kw["quantization_config"] == {"ignore": [e2e.ROUTER_GATES]}
    plain = e2e.engine_kwargs(Path("/m"), None, eager=True, batches=[1, 4], smoke=True)
    assert not {"quantization", "quantization_config", "additional_config"} & set(plain)


def test_router_gates_stay_unquantized_and_only_they():
    # the pattern follows compressed-tensors' "re:" convention, which vLLM's online schemes use
    import re

    pattern = re.compile(e2e.ROUTER_GATES.removeprefix("re:"))
    for name in ("model.layers.0.mlp.gate", "model.layers.47.mlp.gate"):
        assert pattern.match(name)
    for name in ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.shared_expert_gate", "model.layers.0.mlp.experts",
                 "model.layers.0.mlp.shared_expert.gate_up_proj", "model.layers.0.self_attn.qkv_proj", "lm_head"):
        assert not pattern.match(name)


def test_plain_fp8_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="'fp8' is not one of fp8_per_block.*collapses the dummy routing"):
        e2e.quantization_kwargs("fp8")


def test_parse_args_takes_quantization():
    args = e2e.parse_args(["--smoke", "--quantization", "fp8_per_block"])
    assert args.quantization == "fp8_per_block"
    assert e2e.parse_args(["--smoke"]).quantization is None
    with pytest.raises(SystemExit):
        e2e.parse_args(["--smoke", "--quantization", "fp8"])


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
        "sere-s1-merge": {"rows": rows(6.3), "sere": e2e.sere_config("sere-s1-merge"), "rerouted_layers": 48,
                          "fused_topk_layers": 0, "merged_layers": 48, "merge_tokens": 4, "backend": "numba",
                          "start_s": 60.0},
        "sere-s1-nomerge": {"rows": rows(6.4), "sere": e2e.sere_config("sere-s1-nomerge"), "rerouted_layers": 48,
                            "fused_topk_layers": 0, "merged_layers": 0, "merge_tokens": None, "backend": "numba",
                            "start_s": 60.0},
    }
    text = vllm_decode.summarize(results)
    assert "| sere-s1-fused | 16 | 8.000 |  | 2000 | 2.00x |" in text  # one repetition: no range
    assert "sere-s1-fused: 48 layers re-routed, router top-k fused on 48" in text
    assert "sere-s1: 48 layers re-routed, backend numba" in text  # no fused clause where not asked
    assert "sere-s1-merge: 48 layers re-routed, slots merged on 48 in calls of T <= 4, backend numba" in text
    assert "sere-s1-nomerge: 48 layers re-routed, slots not merged, backend numba" in text


@pytest.mark.vllm
def test_vllm_resolves_the_scheme_and_skips_only_the_gates():
    # vLLM's own resolver and layer matcher (the online schemes' path) on the kwargs the bench passes
    from vllm.config.quantization import resolve_quantization_config
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    kw = e2e.quantization_kwargs("fp8_per_block")
    args = resolve_quantization_config(kw["quantization"], kw["quantization_config"])
    assert args.moe is not None and args.linear is not None and args.moe.weight.scale.group_shape.row == 128
    fused = {"gate_up_proj": ["gate_proj", "up_proj"], "qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert should_ignore_layer("model.layers.5.mlp.gate", ignore=args.ignore, fused_mapping=fused)
    for name in ("model.layers.5.mlp.experts", "model.layers.5.mlp.gate_up_proj", "model.layers.5.self_attn.qkv_proj"):
        assert not should_ignore_layer(name, ignore=args.ignore, fused_mapping=fused)


def test_summary_gives_the_repetitions_and_says_where_they_overlap_stocks():
    row = lambda reps: {"rows": [{"batch": 16, "step_ms": sorted(reps)[1], "step_ms_all": reps,  # noqa: E731
                                  "tokens_per_s": 16 / sorted(reps)[1] * 1e3}],
                        "sere": e2e.sere_config("sere-s1"), "rerouted_layers": 48, "fused_topk_layers": 0,
                        "backend": "numba", "start_s": 60.0}
    results = {"stock": row([10.0, 10.4, 10.2]), "sere-s1": row([6.4, 6.5, 6.45]), "sere-s2": row([9.9, 10.6, 10.1])}
    text = vllm_decode.summarize(results)
    assert "| stock | 16 | 10.200 | 10.000-10.400 |" in text
    assert "| sere-s1 | 16 | 6.450 | 6.400-6.500 | 2481 | 1.58x |" in text  # apart: no mark
    assert "| sere-s2 | 16 | 10.100 | 9.900-10.600 | 1584 | 1.01x (repetitions overlap) |" in text


def test_summary_says_so_where_stock_has_no_row():
    # a run whose stock engine timed out printed "nanx" as the speed-up (H100, 2026-12-07)
    rows = [{"batch": 1, "step_ms": 3.9, "tokens_per_s": 256.0}]
    results = {"sere-s1": {"rows": rows, "sere": e2e.sere_config("sere-s1"), "rerouted_layers": 48,
                           "fused_topk_layers": 0, "backend": "numba", "start_s": 60.0}}
    text = vllm_decode.summarize(results)
    assert "| sere-s1 | 1 | 3.900 |  | 256 | no stock row |" in text and "nan" not in text


def test_the_first_engine_gets_the_cold_start_allowance(monkeypatch, tmp_path):
    timeouts = []
    monkeypatch.setattr(vllm_decode.engine, "prepare", lambda args: None)
    monkeypatch.setattr(vllm_decode.engine, "run_engine",
                        lambda name, args, timeout: (timeouts.append(timeout), (None, f"== {name}: failed"))[1])
    args = e2e.parse_args(["--model", "qwen3-30b-a3b", "--out", str(tmp_path), "--only", "stock,sere-s1",
                           "--engine-timeout", "170", "--first-engine-extra", "60"], vllm_decode.build_parser())
    assert vllm_decode.parent(args) == 1
    assert timeouts == [230, 170]
