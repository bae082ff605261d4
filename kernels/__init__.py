"""SERE routing kernels.

- `reference`: plain Python loops over NumPy; obviously right, slow; the oracle of every test.
- `vectorized`: PyTorch tensor ops; CPU and CUDA, no host sync, graph- and compile-safe.
- `numba_cuda`: one-launch Numba CUDA kernel, registered as the torch custom op `sere::reroute`.
  It is the entry module; the work is split over `numba_*.py` (its docstring lists them).

The contract all three follow is written out in `sere.routing`.
"""
