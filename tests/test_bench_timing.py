"""bench/timing.py's pytest-benchmark adapters: the statistics a saved run holds must be the
times the bench measured (what --benchmark-compare then gates on).

    pytest tests/test_bench_timing.py        # ~10 s: pytest runs in subprocesses
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SAMPLES_BENCH = '''
import pytest
from bench.timing import benchmark_samples


def test_given_samples(benchmark):
    benchmark_samples(benchmark, [0.003, 0.001, 0.002, 0.0025], what="measured elsewhere")


def test_no_samples(benchmark):
    with pytest.raises(ValueError, match="no samples"):
        benchmark_samples(benchmark, [], what="nothing")
'''


def _run(tmp_path, *extra):
    bench = tmp_path / "test_samples_bench.py"
    bench.write_text(SAMPLES_BENCH)
    out = tmp_path / "run.json"
    # The bench file sits in tmp_path; the repository root on the path gives it the `bench` package.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(bench),
                           f"--benchmark-json={out}", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()) if out.exists() else None


def test_benchmark_samples_become_the_saved_statistics(tmp_path):
    data = _run(tmp_path)
    (case,) = [b for b in data["benchmarks"] if b["name"] == "test_given_samples"]
    stats = case["stats"]
    assert stats["rounds"] == 4 and stats["iterations"] == 1
    assert stats["min"] == pytest.approx(0.001) and stats["max"] == pytest.approx(0.003)
    assert stats["median"] == pytest.approx(0.00225)
    assert sorted(stats["data"]) == pytest.approx([0.001, 0.002, 0.0025, 0.003])
    assert case["extra_info"]["timing"] == "measured elsewhere"


def test_benchmark_samples_with_benchmarks_disabled(tmp_path):
    data = _run(tmp_path, "--benchmark-disable")
    assert data is None or not data["benchmarks"]  # ran (rc 0 above), nothing timed or saved
