"""The SERE settings that benches, the accuracy gate and the accuracy sweep run, defined once.

    from sere.harness.settings import PAPER, STOCK, SERE_S1
    SERE_S1.S, SERE_S1.rho, SERE_S1.label     # 1, 0.0, "S1-rho0"
    for S, rho in PAPER: ...                  # a Setting unpacks as (S, rho)

A Setting is (S, rho): S primary slots and threshold rho, or (None, None) for stock routing.
Its label ("stock", "S1-rho0", "S2-rho0.1", ...) names bench cases and report rows, so it must
not change: saved benchmark runs and the report match cases by it.
"""
from __future__ import annotations

from typing import NamedTuple


class Setting(NamedTuple):
    S: int | None  # primary slots; None: stock routing
    rho: float | None  # threshold; None: stock routing

    @property
    def is_stock(self) -> bool:
        return self.S is None

    @property
    def label(self) -> str:
        return "stock" if self.is_stock else f"S{self.S}-rho{self.rho:g}"

    def sere_config(self) -> dict | None:
        """The SERE keyword arguments of this setting (vLLM's additional_config["sere"]); None for stock."""
        return None if self.is_stock else {"select_top_k": self.S, "threshold": self.rho}


STOCK = Setting(None, None)
SERE_S1 = Setting(1, 0.0)  # the paper's first setting: only the batch's top-1 experts stay
SERE_S2 = Setting(2, 0.1)  # the paper's second: top-2 primary, an expert stays below similarity 0.1
PAPER = (SERE_S1, SERE_S2)
STOCK_AND_PAPER = (STOCK, *PAPER)  # stock first: SERE cases of a run find its stock time
# The threshold sweep of the layer benches at real size.
THRESHOLD_GRID = tuple(Setting(S, rho) for S in (1, 2) for rho in (0.0, 0.1, 0.3, 0.5))
STOCK_AND_GRID = (STOCK, *THRESHOLD_GRID)
# The end-to-end bench's engines: one vLLM engine per setting, named on its command line.
ENGINES = {"stock": STOCK, "sere-s1": SERE_S1, "sere-s2": SERE_S2}
# Decode batch sizes (tokens per step) of the layer and end-to-end benches at real size.
DECODE_BATCHES = (1, 8, 16, 32, 64, 128, 256)
