"""pytest set-up of the benchmark suites in bench/ (pytest-benchmark).

How to run (see also the module docstrings of each bench file):
    pytest bench                         # CPU: small configs, synthetic routing, quick timing, tables
    pytest bench --benchmark-disable     # smoke: every case runs once and validates, no timing
    pytest bench                         # on a CUDA machine: real shapes, GPU timing (graphs/events)
    # the regression gate, on ONE machine (base first, then the change):
    pytest bench --benchmark-autosave
    pytest bench --benchmark-compare --benchmark-compare-fail=median:10%

What this file adds:
- Machine info: GPU name, count, memory, SMs, compute capability, driver, and the versions of
  torch, CUDA, cuDNN, triton, numba, numba-cuda, transformers and vLLM are added to
  pytest-benchmark's `machine_info` (saved with every run; compared runs warn when it differs).
- Per-machine storage: pytest-benchmark files its runs under STORAGE/<platform id>, and the
  platform id knows nothing of GPUs. This conftest puts a machine key first:
  STORAGE/<machine key>/<platform id>/NNNN_*.json, key = host name + GPU model (or CPU model),
  so `--benchmark-compare` only ever finds runs of the same machine. Override the key with
  SERE_BENCH_MACHINE=name (e.g. a CI runner class whose hosts are interchangeable).
- Quick timing on the CPU: without a GPU, and unless you set --benchmark-max-time,
  --benchmark-min-rounds or ask to save/compare, each case is timed for at most 0.1 s
  (min 3 rounds) so `pytest bench` stays a couple of minutes on two cores while still
  printing a table. Saving, comparing or a GPU gives the normal pytest-benchmark budget.
- One CPU thread: without a GPU, torch runs with one intra-op thread during the benches
  (SERE_BENCH_THREADS=n to change). On a shared machine an OpenMP region waits for its
  slowest thread; with two threads on two busy cores a 50 us op measured 13 ms.
- A module's `GPU_CACHE` dict (built layers) is emptied when the module ends.
- Session fixtures: `copy_bandwidth` (bytes/s, measured once per session: a large copy,
  read + write counted, the floor every weight-streaming kernel is measured against;
  bench/timing.py), `stock_times` (bench/extra_info.py StockTimes: stock cases store their time
  so that SERE cases of the same run compute their speed-up) and `bench_device`.
- A SERE summary table at the very end of the run (after pytest-benchmark's table;
  bench/summary.py): for every case that recorded `setting` in extra_info, activated experts
  before/after and the share saved, time, GB/s, share of the HBM floor, speed-up, with the
  columns explained under it. On the CPU its heading says that the timing is a smoke run that
  does not model GPU memory bandwidth, and that the activated experts are what holds there.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from functools import lru_cache

import pytest

_QUICK_MAX_TIME = "0.1"
_QUICK_MIN_ROUNDS = 3
_PACKAGES = ("torch", "triton", "numba", "numba-cuda", "transformers", "vllm", "pytest-benchmark")


@lru_cache(maxsize=None)
def _gpu_info() -> dict:
    """GPU facts for machine_info; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sm_count": props.multi_processor_count,
        "gpu_capability": "%d.%d" % (props.major, props.minor),
        "cuda_runtime": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()),
    }
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        info["gpu_driver"] = out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["gpu_driver"] = "unknown (nvidia-smi not usable)"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_key() -> str:
    """Storage folder of this machine: SERE_BENCH_MACHINE, else host name + GPU (or CPU) model."""
    key = os.environ.get("SERE_BENCH_MACHINE") or f"{platform.node()}-{_gpu_info().get('gpu_name') or _cpu_model()}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sere"] = {
        "machine_key": machine_key(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        **_gpu_info(),
        "versions": _versions(),
    }


def _per_machine_storage(config) -> None:
    storage = config.getoption("benchmark_storage", None)
    if storage is None or "://" in storage and not storage.startswith("file://"):
        return  # pytest-benchmark not loaded, or a non-file storage (elasticsearch) keeps its layout
    root = storage[len("file://"):] if storage.startswith("file://") else storage
    config.option.benchmark_storage = "file://" + os.path.join(root, machine_key())


def _quick_cpu_timing(config) -> None:
    import torch

    if torch.cuda.is_available() or config.getoption("benchmark_disable", False):
        return
    if any(config.getoption(o, None) for o in ("benchmark_save", "benchmark_autosave", "benchmark_compare",
                                                "benchmark_json", "benchmark_enable")):
        return  # a run meant to be kept or compared gets the full budget
    defaults = {"benchmark_max_time": "1.0", "benchmark_min_rounds": 5}
    if str(config.getoption("benchmark_max_time")) != defaults["benchmark_max_time"]:
        return
    if config.getoption("benchmark_min_rounds") != defaults["benchmark_min_rounds"]:
        return
    config.option.benchmark_max_time = _QUICK_MAX_TIME
    config.option.benchmark_min_rounds = _QUICK_MIN_ROUNDS
    config._sere_quick_timing = True


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which opens the storage.
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    _per_machine_storage(config)
    _quick_cpu_timing(config)


def pytest_report_header(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        return None
    quick = " (quick CPU timing: 0.1 s per case; see bench/conftest.py)" if getattr(config, "_sere_quick_timing", False) else ""
    return f"sere bench: machine key {machine_key()}, storage {config.getoption('benchmark_storage')}{quick}"


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads():
    """One intra-op thread on the CPU (see the module docstring), restored afterwards."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SERE_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bench_device():
    """"cuda" where a GPU is present (real shapes), else "cpu" (small configs)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def copy_bandwidth(bench_device) -> float:
    """Measured copy bandwidth of the bench device, bytes/s (once per session)."""
    from bench.timing import measure_copy_bandwidth  # imported here: the gate test runs a copy of this file alone

    return measure_copy_bandwidth(bench_device)


@pytest.fixture(scope="module", autouse=True)
def _empty_gpu_cache_after_module(request):
    """A bench module that keeps built layers in a module-level dict `GPU_CACHE` has it emptied,
    and the CUDA caching allocator's memory returned, when the module ends: the next module (the
    end-to-end bench's vLLM engines above all) finds the GPU free."""
    yield
    cache = getattr(request.module, "GPU_CACHE", None)
    if cache:
        import torch

        cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def stock_times():
    """bench.extra_info.StockTimes of this run: stock cases record, SERE cases read their speed-up."""
    from bench.extra_info import StockTimes

    return StockTimes()


# --- summary table ----------------------------------------------------------------------


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table (its hook is plain): the SERE table comes last
def pytest_terminal_summary(terminalreporter, config):
    bs = getattr(config, "_benchmarksession", None)
    infos = [info for info in (getattr(b, "extra_info", None) or {} for b in getattr(bs, "benchmarks", None) or [])
             if "setting" in info]
    if not infos:
        return
    import torch

    from bench.summary import TITLE, is_cpu, summary_lines
    from sere.harness.report import model_label

    on_cpu = any(is_cpu(info) for info in infos) or not torch.cuda.is_available()
    terminalreporter.write_sep("-", TITLE + (" -- CPU smoke run" if on_cpu else ""))
    for line in summary_lines(infos, on_cpu=on_cpu, label=model_label):
        terminalreporter.write_line(line)
