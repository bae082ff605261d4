"""Device probe: the large-T path's launch-2 grid cap (blocks per SM) at T = 1024 / 4096, S = 1,
by CUDA-graph replay (E = 128, k = 8; ids checked against the reference first).

    python -m bench.lab.probe_large_grid        (on a CUDA machine, from the repo root)
Measured on an H100 (2026-12-06, bench/results/gpu_2026-12-06/probe_large_grid.txt): wider is slower.
"""
from __future__ import annotations

import torch

from bench.test_bench_reroute import RHO, make_inputs
from bench.timing import time_graph_replay
from sere.kernels import numba_launch as nl
from sere.kernels.numba_cuda import reroute_numba
from sere.kernels.reference import reroute_reference

BLOCKS_PER_SM = (4, 16, 64, 256)


def main() -> None:
    keep = nl.TWO_LAUNCH_BLOCKS_PER_SM
    try:
        for T in (1024, 4096):
            for routing in ("uniform", "zipf"):
                ids, sim = make_inputs(T, routing, "cuda")
                want = torch.from_numpy(reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), 1, RHO))
                row = []
                for bps in BLOCKS_PER_SM:
                    nl.TWO_LAUNCH_BLOCKS_PER_SM = bps
                    assert torch.equal(reroute_numba(ids, sim, 1, RHO).cpu(), want), bps
                    row.append(time_graph_replay(lambda: reroute_numba(ids, sim, 1, RHO), calls=100, repeats=20).median_us)
                print(f"two-launch grid T={T} {routing}: blocks/SM {' '.join(map(str, BLOCKS_PER_SM))} -> "
                      + " ".join(f"{x:.2f}" for x in row))
    finally:
        nl.TWO_LAUNCH_BLOCKS_PER_SM = keep


if __name__ == "__main__":
    main()
