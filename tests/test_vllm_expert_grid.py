"""tight_grid's wrapper on vLLM itself (marker `vllm`; the CPU parts are tests/test_expert_grid.py):
sere.vllm.expert_grid.install wraps _prepare_expert_assignment where vLLM's Triton expert paths
call it, once, and a layer keeps a floor only where rho is at most its smallest similarity.

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_expert_grid.py
"""
from __future__ import annotations

import pytest
import torch

from sere.config import SereConfig
from sere.vllm import expert_grid
from sere.vllm.router import _tight_grid_on


@pytest.mark.vllm
def test_install_wraps_vllms_triton_paths(monkeypatch):
    import importlib

    modules = [importlib.import_module(m) for m in expert_grid.PATCHED_MODULES]
    for m in modules:  # undone after the test
        monkeypatch.setattr(m, expert_grid.FUNCTION, getattr(m, expert_grid.FUNCTION))
    assert expert_grid.install() == list(expert_grid.PATCHED_MODULES)
    first = [getattr(m, expert_grid.FUNCTION) for m in modules]
    assert all(f._sere_bounded for f in first)
    expert_grid.install()  # again: not wrapped twice
    assert [getattr(m, expert_grid.FUNCTION) for m in modules] == first
    assert _tight_grid_on(SereConfig(threshold=0.3, tight_grid=True), None, torch.device("cuda")) is True
    assert expert_grid.bound_floor(torch.full((4, 4), 0.5), 0.3) == 0.5
    assert expert_grid.bound_floor(torch.full((4, 4), 0.2), 0.3) is None  # rho above a similarity


@pytest.mark.vllm
def test_the_waves_probe_cuts_every_path_and_restores_them():
    import importlib

    from bench.lab.probe_expert_waves import grid_cut

    modules = [importlib.import_module(m) for m in expert_grid.PATCHED_MODULES]
    before = [getattr(m, expert_grid.FUNCTION) for m in modules]
    with grid_cut():
        inside = [getattr(m, expert_grid.FUNCTION) for m in modules]
        assert all(f._sere_bounded for f in inside)
        assert [f.__wrapped__ for f in inside] == before  # wrapped once, not wrapper over wrapper
    assert [getattr(m, expert_grid.FUNCTION) for m in modules] == before
