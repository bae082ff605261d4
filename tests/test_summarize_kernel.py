"""bench.gpu.summarize_kernel: the fused top-k table from a synthetic pytest-benchmark JSON."""
from __future__ import annotations

import json

from bench.gpu import summarize_kernel


def case(T, S, backend, routing="router-logits", **extra):
    info = {"method": "graph", "routing": routing, "T": T, "S": S, "backend": backend,
            "experts_before": 8.0, "experts_after": 1.0, **extra}
    return {"extra_info": info}


def summarize(data, tmp_path, capsys) -> str:
    """What summarize_kernel prints for this pytest-benchmark JSON."""
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    summarize_kernel.main(str(path))
    return capsys.readouterr().out


def test_fused_table_puts_the_merging_variant_beside_the_plain_one(tmp_path, capsys):
    data = {"benchmarks": [
        case(1, 1, "numba_fused_topk", us_per_call=4.0, topk_then_reroute_us_per_call=6.0,
             stock_topk_us_per_call=3.8, added_over_stock_topk_us=0.2),
        case(1, 1, "numba_fused_topk_merged", us_per_call=4.5, topk_then_merged_us_per_call=7.0),
        case(4, 1, "numba_fused_topk_merged", us_per_call=4.9, topk_then_merged_us_per_call=7.2),
    ]}
    out = summarize(data, tmp_path, capsys)
    assert "| 1 | 1 | 4.0 | 6.0 | 3.8 | 0.2 | 1.50x | 4.5 | 7.0 |" in out
    assert "| 4 | 1 | - | - | - | - | - | 4.9 | 7.2 |" in out  # merged only: the plain columns say so


def test_a_case_that_failed_after_its_timing_is_named_not_a_crash(tmp_path, capsys):
    """A case whose assertion failed after timing leaves extra_info without its case record."""
    data = {"benchmarks": [
        case(1, 1, "numba_fused_topk", us_per_call=4.0, topk_then_reroute_us_per_call=6.0,
             stock_topk_us_per_call=3.8, added_over_stock_topk_us=0.2),
        {"name": "test_gpu_fused_topk_merged[1-1]", "extra_info": {"timing": "graph"}},
    ]}
    for bench in data["benchmarks"]:
        bench.setdefault("name", "test_gpu_fused_topk[1-1]")
    out = summarize(data, tmp_path, capsys)
    assert "failed after timing (no case record): test_gpu_fused_topk_merged[1-1]" in out
    assert "| 1 | 1 | 4.0 | 6.0 | 3.8 | 0.2 | 1.50x |" in out


def test_graph_table_shows_the_one_launch_floor_beside_the_plain_kernel(tmp_path, capsys):
    data = {"benchmarks": [
        case(1, 1, "numba", "uniform", us_per_call=2.2, baseline_us_per_call=3.6, speedup_vs_baseline=1.64,
              torch_us_per_call=40.0, speedup_vs_torch=18.2, empty_launch_us_per_call=1.6,
              copy_launch_us_per_call=1.7, gather_launch_us_per_call=1.9),
        case(1, 1, "baseline", "uniform", us_per_call=3.6),
        case(16, 1, "numba", "uniform", us_per_call=2.6),  # an older JSON without the floor: a dash, not a crash
    ]}
    out = summarize(data, tmp_path, capsys)
    assert "one-launch floor (empty / copy / gather)" in out
    assert "| uniform | 1 | 1 | 2.2 | 1.6 / 1.7 / 1.9 | 3.6 | - | 1.64x | 18.2x |" in out
    assert "| uniform | 16 | 1 | 2.6 | - |" in out


def test_fused_kernel_by_chunk_table(tmp_path, capsys):
    """The chunk timings of a fused case get their own table; a case without them is left out of it."""
    data = {"benchmarks": [
        case(8, 1, "numba_fused_topk", us_per_call=6.0, chunk1_us_per_call=6.1, chunk2_us_per_call=6.9,
             chunk4_us_per_call=7.7, chunk8_us_per_call=9.3),
        case(1, 1, "numba_fused_topk", us_per_call=5.5),
    ]}
    out = summarize(data, tmp_path, capsys)
    table = out.split("by chunk")[1]
    assert "| 8 | 1 | 6.1 | 6.9 | 7.7 | 9.3 |" in table
    assert "| 1 | 1 |" not in table
