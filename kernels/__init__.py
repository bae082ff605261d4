"""SERE routing kernels.

- `reference`: plain Python loops over NumPy; obviously right, slow; the oracle of every test.
- `vectorized`: PyTorch tensor ops; CPU and CUDA, no host sync, graph- and compile-safe.
- `numba_cuda`: one-launch Numba CUDA kernel, registered as the torch custom op `sere::reroute`.
  It is the entry module; the work is split over `numba_*.py` (its docstring lists them).

The contract all three follow is written out in `sere.routing`.

This folder is the package `sere.kernels` (setuptools package-dir). Imported under its folder
name `kernels`, which happens whenever the checkout's root is on sys.path (pytest's root
conftest, `python -m` from the root), it would shadow the PyPI package `kernels` that
transformers (>= 5.25 requires it) imports; it then hands that name over to the PyPI package
where one is installed (see `_hand_over`). Where none is, it stays this plain module without a
`__version__`: transformers' probe (which imports the package when no metadata names it, as in
5.17) then reads it as "no usable kernels package" and goes on without it.
"""


def _hand_over() -> None:
    """Replace this module in sys.modules by the `kernels` found on sys.path outside this
    checkout. The import system returns sys.modules[name] after running a module, so the
    importer gets the replacement."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    this = os.path.abspath(__file__)
    elsewhere = [p for p in sys.path if os.path.abspath(os.path.join(p or os.curdir, "kernels", "__init__.py")) != this]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return  # no PyPI package to hand over to: stay a plain, version-less module
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(__name__, None)
        raise


if __name__ == "kernels":
    _hand_over()
