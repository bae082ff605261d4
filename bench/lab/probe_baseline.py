"""Device probe: the research-structure baseline's scan with 1-32 similarity loads in flight,
by CUDA-graph replay, next to the one-launch kernel; to place the baseline against the
published kernel's times (H200: 3.6 / 3.6 / 3.8 / 4.0 us at T = 1 / 16 / 64 / 256, 6.5 us at
T = 4096; E = 128, k = 8, S = 1).

    python -m bench.lab.probe_baseline            (on a CUDA machine, from the repo root)
"""
from __future__ import annotations

import torch

from bench.test_bench_reroute import RHO, make_inputs
from bench.timing import time_graph_replay
from sere.kernels.numba_cuda import reroute_numba
from sere.kernels.reference import reroute_reference
from sere.kernels.research_baseline import reroute_research_baseline

UNROLLS = (1, 4, 8, 16, 32)
T_VALUES = (1, 16, 64, 256, 4096)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: us per call, graph replay, E=128 k=8 S=1 rho={RHO}")
    print("T     numba  " + "  ".join(f"unroll{u:<3d}" for u in UNROLLS))
    for T in T_VALUES:
        ids, sim = make_inputs(T, "uniform", "cuda")
        want = torch.from_numpy(reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), 1, RHO))
        cells = [time_graph_replay(lambda: reroute_numba(ids, sim, 1, RHO), calls=100, repeats=20).median_us]
        for u in UNROLLS:
            fn = lambda u=u: reroute_research_baseline(ids, sim, 1, RHO, unroll=u)  # noqa: E731
            assert torch.equal(fn().cpu(), want), u
            cells.append(time_graph_replay(fn, calls=100, repeats=20).median_us)
        print(f"{T:<5d} " + "  ".join(f"{c:8.2f}" for c in cells))


if __name__ == "__main__":
    main()
