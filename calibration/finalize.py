"""The last step every similarity metric shares: an exact, safe [E, E] matrix."""
from __future__ import annotations

import torch


def finalize_similarity(sim: torch.Tensor) -> torch.Tensor:
    """Symmetrise, clamp to [0, 1], set the diagonal to 1; float32. Raises on NaN / inf.

    Rounding leaves matmul-built matrices a few ulps from symmetric and just outside [0, 1];
    a NaN here means a metric bug (every metric guards its divisions), so it is not masked.
    """
    if not bool(torch.isfinite(sim).all()):
        raise FloatingPointError(f"similarity has non-finite values: {sim}")
    sim = ((sim + sim.T) / 2).clamp(0.0, 1.0).float()  # E, E
    return sim.fill_diagonal_(1.0)
