"""Numba CUDA kernel of the SERE routing contract (one launch; two at large T), as the custom op `sere::reroute`.

The public entry: the names callers use, re-exported from the modules that do the work.
Run its checks: `pytest tests/test_numba_simulator.py` (CPU, CUDA simulator, NumPy inputs) and
`pytest -m gpu tests/test_gpu_kernels.py` (a CUDA GPU). The contract is written out in
`sere.routing`; the oracle every test compares with is `sere.kernels.reference.reroute_reference`.

- `numba_runtime`: the guarded numba-cuda import, `simulator_enabled`, `available`.
- `numba_device`: device primitives (group argmax, bfloat16 widening), GPU and simulator flavours.
- `numba_kernels`: the kernel bodies (one-launch, and the two launches of the large-T path);
  how the kernel works is written out there.
- `numba_pointer`: signatures, kernels compiled for raw pointers, their launch and cache.
- `numba_launch`: the shape rule (one or two launches, grid, column bucket) and `launch_reroute`.
- `numba_op`: the torch custom ops `torch.ops.sere.reroute`, `torch.ops.sere.reroute_in_weight_order`,
  `torch.ops.sere.reroute_merged` and their entries `reroute_numba`, `reroute_numba_in_weight_order`
  (slots not sorted by weight), `reroute_numba_merged` (ids and weights, duplicate slots merged).
- `numba_numpy`: `reroute_numba_numpy`, the same kernels on NumPy arrays (the simulator tests),
  `reroute_merged_numba_numpy` and `topk_reroute_numba_numpy` for the merging and fused ones.
- `numba_topk`, `numba_topk_op`: the router's softmax top-k and the re-routing fused in one kernel
  (`topk_reroute_numba`, op `torch.ops.sere.topk_reroute`), to replace the router's own top-k.

This stays a plain module (torch.compile traces `from sere.kernels.numba_cuda import ...` and
accepts only plain modules), so its names are copies: to change a knob, set it in the module
that reads it, e.g. `numba_launch.TWO_LAUNCH_MIN_TOKENS` (read at call time by the shape rule).
"""
from __future__ import annotations

from sere.kernels.numba_kernels import MAX_EXPERTS
from sere.kernels.numba_launch import TWO_LAUNCH_MIN_TOKENS, columns_per_lane, launch_reroute, use_two_launch
from sere.kernels.numba_numpy import reroute_merged_numba_numpy, reroute_numba_numpy
from sere.kernels.numba_op import reroute_numba, reroute_numba_in_weight_order, reroute_numba_merged
from sere.kernels.numba_topk_op import topk_reroute_numba
from sere.kernels.numba_pointer import pointer_kernel
from sere.kernels.numba_runtime import available, simulator_enabled

__all__ = [
    "MAX_EXPERTS",
    "TWO_LAUNCH_MIN_TOKENS",
    "available",
    "columns_per_lane",
    "launch_reroute",
    "pointer_kernel",
    "reroute_numba",
    "reroute_merged_numba_numpy",
    "reroute_numba_in_weight_order",
    "reroute_numba_merged",
    "reroute_numba_numpy",
    "simulator_enabled",
    "topk_reroute_numba",
    "use_two_launch",
]
