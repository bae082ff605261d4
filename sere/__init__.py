"""SERE: similarity-based expert re-routing for batch decoding of Mixture-of-Experts models.

    import sere
    new_ids = sere.reroute(topk_ids, similarity, select_top_k=1, threshold=0.1)
"""
import os as _os

# An install maps the folders kernels/ and calibration/ into this package (setuptools
# package-dir). In a source checkout used without installing (PYTHONPATH=., as on a bare GPU
# host), let the same imports work by also searching the checkout's root for subpackages.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "reference.py")
):
    __path__.append(_root)  # noqa: F821 (the package's own search path)

from sere.config import SereConfig  # noqa: E402
from sere.routing import BACKENDS, reroute, reroute_with_stats  # noqa: E402
from sere.stats import RerouteStats  # noqa: E402

__all__ = ["BACKENDS", "RerouteStats", "SereConfig", "reroute", "reroute_with_stats"]
__version__ = "0.1.0"
