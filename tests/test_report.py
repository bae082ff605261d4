"""Tests of `python -m sere.harness.report`: table values, plots, errors, and a real tiny bench run.

    pytest tests/test_report.py            # the last test runs the layer bench (slow, ~15 s)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sere.harness import report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(model, routing, T, setting, median_s, before, after, name=None):
    return {
        "name": name or f"test_moe_layer[{model}-{routing}-T{T}-{setting}]",
        "stats": {"median": median_s},
        "extra_info": {"model": model, "routing": routing, "tokens": T, "setting": setting,
                       "experts_before": before, "experts_after": after,
                       "expert_bytes": after * 1_000_000, "hbm_floor_us": after * 0.5},
    }


# Stock and two settings at two batch sizes, one model; plus a case of another bench.
FAKE_RUN = {
    "machine_info": {}, "commit_info": {}, "benchmarks": [
        _bench("M", "uniform", 1, "stock", 100e-6, 8, 8),
        _bench("M", "uniform", 1, "S1-rho0", 50e-6, 8, 1),
        _bench("M", "uniform", 16, "stock", 300e-6, 84, 84),
        _bench("M", "uniform", 16, "S1-rho0", 100e-6, 84, 15),
        _bench("M", "uniform", 16, "S2-rho0.1", 150e-6, 84, 29),
        {"name": "test_reroute_kernel[T64]", "stats": {"median": 3e-6}, "extra_info": {"backend": "numba"}},
    ],
}


@pytest.fixture
def fake_json(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(FAKE_RUN))
    return path


def test_speedup_comes_from_medians_of_the_same_run(fake_json):
    cases = report.load_cases(fake_json)
    assert len(cases) == 5  # the kernel-bench entry is not a layer case
    ratio = {(c.tokens, c.setting): r for c, r in report.speedups(cases).items()}
    assert ratio[(16, "S1-rho0")] == pytest.approx(3.0)
    assert ratio[(16, "S2-rho0.1")] == pytest.approx(2.0)
    assert ratio[(1, "S1-rho0")] == pytest.approx(2.0)
    assert ratio[(1, "stock")] == pytest.approx(1.0)


def test_table_rows_hold_experts_bandwidth_and_floor_share(fake_json):
    rows = {(r[2], r[3]): r for r in report.table_rows(report.load_cases(fake_json))}
    _, _, _, _, before, after, us, gbps, share, speedup = rows[(16, "S1-rho0")]
    assert (before, after) == (84, 15)
    assert us == pytest.approx(100.0)
    assert gbps == pytest.approx(15e6 / 100e-6 / 1e9)  # 150 GB/s
    assert share == pytest.approx(7.5 / 100.0)
    assert speedup == pytest.approx(3.0)


def test_several_files_merge_but_speedups_stay_within_a_run(fake_json, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": [
        _bench("N", "uniform", 1, "stock", 40e-6, 8, 8),
        _bench("N", "uniform", 1, "S1-rho0", 20e-6, 8, 1),
        _bench("M", "uniform", 16, "S1-rho0", 60e-6, 84, 15),  # M's stock is in the other run
    ]}))
    text, paths = report.render([fake_json, other], tmp_path / "both")
    cases = report.load_cases(fake_json) + report.load_cases(other)
    ratio = {(c.run == str(other), c.model, c.tokens, c.setting): r for c, r in report.speedups(cases).items()}
    assert ratio[(True, "N", 1, "S1-rho0")] == pytest.approx(2.0)
    assert ratio[(True, "M", 16, "S1-rho0")] is None
    assert ratio[(False, "M", 16, "S1-rho0")] == pytest.approx(3.0)
    assert {p.name for p in paths} >= {"report.md", "speedup_N_uniform.png", "experts_M_uniform.png"}
    assert "other.json" in (tmp_path / "both" / "report.md").read_text()


def test_fused_layer_cases_are_apart_from_the_transformers_layer(tmp_path):
    """The same model, routing and batch on the vLLM fused layer is another row with its own stock."""
    fused_stock = _bench("M", "uniform", 16, "stock", 200e-6, 84, 84)
    fused_sere = _bench("M", "uniform", 16, "S1-rho0", 100e-6, 84, 15)
    for b in (fused_stock, fused_sere):
        b["extra_info"]["layer"] = "vllm-fused"
        b["name"] = b["name"].replace("test_moe_layer", "test_fused_moe_layer")
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": FAKE_RUN["benchmarks"] + [fused_stock, fused_sere]}))
    cases = report.load_cases(path)
    ratio = {(c.model, c.tokens, c.setting): r for c, r in report.speedups(cases).items()}
    assert ratio[("M (vllm-fused)", 16, "S1-rho0")] == pytest.approx(2.0)
    assert ratio[("M", 16, "S1-rho0")] == pytest.approx(3.0)


def test_end_to_end_cases_mean_experts_and_step_weight_bytes(tmp_path):
    """bench/test_bench_vllm_decode.py rows: mean experts (floats), GB/s over all the weights a
    step reads (weight_bytes, not only the experts), experts missing without its counts engine."""
    stock = _bench("M", "model", 16, "stock", 8e-3, 37.5, 37.5)
    sere = _bench("M", "model", 16, "S1-rho0", 4e-3, 37.5, 12.9)
    uncounted = _bench("M", "model", 64, "stock", 10e-3, 0, 0)
    for b in (stock, sere, uncounted):
        b["extra_info"].update(layer="vllm-e2e", weight_bytes=4_000_000_000)
    uncounted["extra_info"].update(experts_before=None, experts_after=None, expert_bytes=None, weight_bytes=None,
                                   hbm_floor_us=None)
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps({"benchmarks": [stock, sere, uncounted]}))
    rows = {(r[2], r[3]): r for r in report.table_rows(report.load_cases(path))}
    model, _, _, _, before, after, us, gbps, _, speedup = rows[(16, "S1-rho0")]
    assert model == "M (vllm-e2e)" and (before, after) == (37.5, 12.9)
    assert us == pytest.approx(4000.0) and speedup == pytest.approx(2.0)
    assert gbps == pytest.approx(4e9 / 4e-3 / 1e9)  # the step's weight bytes, not expert_bytes
    assert rows[(64, "stock")][4:6] == [None, None] and rows[(64, "stock")][7] is None
    text, paths = report.render(path, tmp_path / "rep")
    assert "37.5" in text and len(paths) == 3


def test_nan_experts_are_refused(tmp_path):
    bad = _bench("M", "model", 16, "stock", 8e-3, float("nan"), 1)
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [bad]}))
    with pytest.raises(report.ReportError, match="incomplete extra_info"):
        report.load_cases(path)


def test_missing_stock_gives_no_speedup(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [_bench("M", "uniform", 4, "S1-rho0", 1e-4, 8, 2)]}))
    (case,) = report.load_cases(path)
    assert report.speedups([case]) == {case: None}


def test_cli_writes_table_and_plots(fake_json, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.main([str(fake_json), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "S2-rho0.1" in printed and "speed-up" in printed
    md = (out / "report.md").read_text()
    assert md.count("| M ") == 5
    for kind in ("speedup", "experts"):
        png = out / f"{kind}_M_uniform.png"
        assert png.read_bytes()[:8] == PNG_MAGIC


def _with_machine(data, sere=None, cpu=None):
    return {**data, "machine_info": {"sere": sere or {}, "cpu": cpu or {}}, "datetime": "2026-11-23T10:11:12.5",
            "commit_info": {"id": "0123456789abcdef"}}


@pytest.mark.parametrize("machine,expected,cpu_note", [
    ({"sere": {"gpu_name": "NVIDIA H200", "gpu_count": 1, "gpu_memory_gib": 139.8, "cuda_runtime": "13.0",
               "gpu_driver": "580.1", "versions": {"torch": "2.11.0"}}},
     "bench.json: NVIDIA H200, 139.8 GiB, CUDA 13.0, driver 580.1, torch 2.11.0, 2026-11-23 10:11:12 UTC, "
     "commit 0123456789", False),
    ({"sere": {"cpu_model": "AMD EPYC", "cpu_count": 2}}, "bench.json: CPU AMD EPYC (2 cores), 2026-11-23 10:11:12 UTC, "
     "commit 0123456789", True),
    ({"cpu": {"brand_raw": "Intel Xeon", "count": 4}}, "bench.json: CPU Intel Xeon (4 cores), 2026-11-23 10:11:12 UTC, "
     "commit 0123456789", True),
])
def test_report_names_the_device_explains_its_columns_and_links_its_plots(tmp_path, machine, expected, cpu_note):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_with_machine(FAKE_RUN, **machine)))
    text, paths = report.render(path, tmp_path / "rep")
    assert text.splitlines()[0] == f"device: {expected}"
    assert (report.CPU_NOTE in text) == cpu_note
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"device: {expected}" in md and (report.CPU_NOTE in md) == cpu_note
    for name, _ in report.LEGEND:  # the legend, once, under the table
        assert md.count(f"- **{name}**:") == 1 and f"  {name}: " in text
    assert md.index("| model") < md.index("- **floor share**") < md.index("## Plots")
    plots = [p for p in paths if p.suffix == ".png"]
    assert plots and all(f"![{p.stem}]({p.name})" in md for p in plots)


def test_report_of_a_file_without_machine_info_says_the_device_is_unknown(fake_json):
    text, _ = report.render(fake_json)
    assert text.splitlines()[0] == "device: bench.json: unknown device (no machine_info in the file)"
    assert report.CPU_NOTE not in text


def test_bench_summary_heading_legend_and_saved_share():
    from bench.summary import CPU_CAVEAT, summary_lines

    infos = [dict(b["extra_info"], device="cpu", time_us=b["stats"]["median"] * 1e6, gbps=0.2,
                  hbm_floor_share=0.01, speedup_vs_stock=0.9, copy_bw_gbps=6.5) for b in FAKE_RUN["benchmarks"][:4]]
    lines = summary_lines(infos, on_cpu=True)
    assert lines[:3] == CPU_CAVEAT.splitlines() and "does not model" not in lines[3]
    header = lines[3].split()
    assert header[:8] == ["model", "routing", "T", "setting", "exp.", "before", "exp.", "after"] and "saved" in header
    row = lines[-5].split()  # the last case: M uniform 16 S1-rho0, 84 -> 15 experts
    assert row[:7] == ["M", "uniform", "16", "S1-rho0", "84", "15", "82%"] and row[7] == "100.0"
    assert any("floor share = the HBM floor" in line and "6.5 GB/s here" in line for line in lines[-4:])
    assert lines[-1].startswith("  speed-up = stock time / this time")
    assert summary_lines(infos, on_cpu=False)[0].startswith("model")  # no caveat on a GPU


def test_default_out_dir_is_next_to_the_json(fake_json):
    _, paths = report.render(fake_json)
    assert paths[0] == fake_json.with_name("bench_report") / "report.md"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("not json", "not JSON"),
        ('{"results": []}', "not a pytest-benchmark JSON"),
        ('{"benchmarks": [{"name": "x", "stats": {"median": 1}, "extra_info": {}}]}', "no MoE-layer cases"),
        ('{"benchmarks": [{"name": "x", "extra_info": {"setting": "stock"}}]}', "incomplete extra_info"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    assert report.main([str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_a_tiny_layer_bench_run(tmp_path):
    """End to end: the layer bench writes JSON (one model, two batches, CPU shapes), the
    report command renders it."""
    bench_json = tmp_path / "layer.json"
    env = dict(os.environ, SERE_BENCH_SIZE="small", SERE_BENCH_ROUTING="uniform", SERE_BENCH_ZOO="0", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_layer.py", "-q", "-p", "no:cacheprovider",
         "-k", "Qwen3 and (T1- or T16-) and (stock or S1-rho0)",
         f"--benchmark-json={bench_json}", f"--benchmark-storage=file://{tmp_path / 'store'}",
         "--benchmark-max-time=0.02", "--benchmark-min-rounds=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "rep"
    cli = subprocess.run([sys.executable, "-m", "sere.harness.report", str(bench_json), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    cases = report.load_cases(bench_json)
    assert {(c.tokens, c.setting) for c in cases} == {(1, "stock"), (1, "S1-rho0"), (16, "stock"), (16, "S1-rho0")}
    ratio = report.speedups(cases)
    assert all(r is not None and r > 0 for r in ratio.values())
    by = {(c.tokens, c.setting): c for c in cases}
    assert by[(16, "S1-rho0")].experts_after < by[(16, "stock")].experts_after
    assert (out / "speedup_Qwen3-30B-A3B_uniform.png").read_bytes()[:8] == PNG_MAGIC
    assert "Qwen3-30B-A3B" in cli.stdout
    assert "device: layer.json: CPU " in cli.stdout and report.CPU_NOTE in cli.stdout
    # The SERE summary comes last, after pytest-benchmark's table, with the CPU caveat and its legend.
    text = run.stdout
    assert text.index("Legend:") < text.index("SERE vs stock") < text.index("columns: T = tokens per call")
    assert "CPU smoke run: its times do not model a GPU's memory bandwidth" in text
    summary = text[text.index("SERE vs stock"):]
    assert "exp. before" in summary and "saved" in summary and "floor share = the HBM floor" in summary
