"""Where Numba stands in this process: the guarded import of numba-cuda (an optional
dependency), whether kernels run in the CUDA simulator, and whether a real device is usable.

Every other numba_* module imports `numba` and `cuda` from here, so the NumPy shim below is in
place before the first kernel compile.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

if not hasattr(np, "row_stack"):
    # NumPy 2.5 removed the row_stack alias of vstack; numba-cuda 0.30 still registers an
    # overload for it when its typing registry loads (the first kernel compile) and fails.
    np.row_stack = np.vstack

try:  # numba-cuda is an optional dependency (extra `cuda`)
    import numba
    from numba import cuda

    NUMBA_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only where numba is missing
    numba = cuda = None
    NUMBA_ERROR = exc


def simulator_enabled() -> bool:
    """True when Numba runs CUDA kernels in its Python simulator (NUMBA_ENABLE_CUDASIM=1)."""
    return cuda is not None and bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


@lru_cache(maxsize=None)
def available() -> bool:
    """True where numba-cuda imports and drives a real CUDA device (False under the simulator)."""
    if cuda is None or simulator_enabled():
        return False
    try:
        if not cuda.is_available():
            return False
        cuda.current_context()  # creates (or binds) the primary context torch also uses
        return True
    except Exception:
        return False
