"""Fused-MoE tile configurations tuned for the batches SERE leaves, selected when SERE is on.

vLLM's Triton fused MoE picks its tiles (BLOCK_SIZE_M/N/K, warps, stages) by token count alone,
from a JSON file per (experts E, intermediate size N, GPU name) or, where none ships, a default
rule. After re-routing, the same token count lands on far fewer experts with more tokens each,
so tiles chosen for stock's spread need not suit it (issue 14, target 2). The files in
sere/vllm/moe_tiles/ were measured by bench/gpu/tune_fused_moe.py (one MoE layer, a 72-config
grid, SERE S = 1) and are named as vLLM names its own. With `moe_tiles: "sere"` (the default)
the plugin points VLLM_TUNED_CONFIG_FOLDER at that folder before the engine's first forward,
so vLLM reads a SERE file where one exists for this shape and GPU, and its own files otherwise.
A folder the user set in VLLM_TUNED_CONFIG_FOLDER wins and is left alone.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

TILES_DIR = Path(__file__).with_name("moe_tiles")
ENV = "VLLM_TUNED_CONFIG_FOLDER"
logger = logging.getLogger(__name__)


def shipped_files(folder: Path = TILES_DIR) -> list[str]:
    """Names of the shipped tile files (E=..,N=..,device_name=...json)."""
    return sorted(p.name for p in folder.glob("E=*.json"))


def select_sere_tiles(folder: Path = TILES_DIR, environ=os.environ) -> str | None:
    """Point vLLM's tuned-config lookup at SERE's tiles; returns the folder now in use, or None when
    the user's own folder is kept or none ships. Must run before the first fused-MoE call: vLLM
    caches the lookup per shape (its cache is cleared here in case a call came earlier) and, once
    the engine is up, its environment variables."""
    if environ.get(ENV):
        logger.info("SERE moe_tiles: %s=%s is set, so vLLM reads that folder (SERE's tiles not used)", ENV, environ[ENV])
        return None
    if not shipped_files(folder):
        return None
    environ[ENV] = str(folder)
    try:
        from vllm.model_executor.layers.fused_moe import fused_moe as vllm_fused_moe

        vllm_fused_moe.get_moe_configs.cache_clear()
    except (ImportError, AttributeError):  # another vLLM layout, or no Triton fused MoE (CPU)
        pass
    logger.info("SERE moe_tiles: vLLM reads fused-MoE tiles from %s first (%d files)", folder, len(shipped_files(folder)))
    return str(folder)
