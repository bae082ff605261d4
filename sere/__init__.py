"""SERE: similarity-based expert re-routing for batch decoding of Mixture-of-Experts models.

    import sere
    new_ids = sere.reroute(topk_ids, similarity, select_top_k=1, threshold=0.1)

The runtime (what a serving process imports) is this package less `sere.harness`: routing and
its backends, config, artifact, statistics, the re-router, and the transformers / vLLM
integrations. Nothing in it imports the harness; `import sere` loads torch only. The runtime's
submodules are also reachable as attributes and imported on first use (PEP 562), so
`import sere; sere.artifact.load_similarity(...)` works as written while `import sere` itself
stays light (`sere.hf` loads transformers only when it is touched).
"""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _CheckoutFolders(_abc.MetaPathFinder):
    """An install maps the folders kernels/ and calibration/ into this package (setuptools
    package-dir). In a source checkout used without installing (PYTHONPATH=., as on a bare GPU
    host), map exactly those two the same way, and nothing else of the checkout."""

    def __init__(self, root: str):
        self.folders = {f"{__name__}.{name}": _os.path.join(root, name) for name in ("kernels", "calibration")}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return _util.spec_from_file_location(fullname, _os.path.join(folder, "__init__.py"),
                                             submodule_search_locations=[folder])


_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _util.find_spec is not None and _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "reference.py")
) and not any(isinstance(f, _CheckoutFolders) for f in _sys.meta_path):
    _sys.meta_path.append(_CheckoutFolders(_root))  # last: an installed mapping wins

from sere.config import SereConfig  # noqa: E402
from sere.routing import BACKENDS, reroute, reroute_with_stats  # noqa: E402
from sere.stats import RerouteStats  # noqa: E402

__all__ = ["BACKENDS", "RerouteStats", "SereConfig", "reroute", "reroute_with_stats"]
__version__ = "0.1.0"

# The runtime's submodules, imported when first read as attributes of the package.
_LAZY_SUBMODULES = frozenset({"artifact", "config", "hf", "recorder", "rerouter", "routing", "stats",
                              "transforms", "validation", "vllm"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also binds it on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_SUBMODULES)
