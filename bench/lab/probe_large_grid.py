"""Device probe: the two-launch path's launch-2 grid cap (blocks per SM) at T = 1024 / 4096, graph replay."""
import torch
from bench.test_bench_reroute import make_inputs, RHO
from bench.timing import time_graph_replay
from sere.kernels import numba_launch as nl
from sere.kernels.numba_cuda import reroute_numba
from sere.kernels.reference import reroute_reference
for T in (1024, 4096):
    for routing in ("uniform", "zipf"):
        ids, sim = make_inputs(T, routing, "cuda")
        want = torch.from_numpy(reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), 1, RHO))
        row = []
        for bps in (4, 16, 64, 256):
            nl.TWO_LAUNCH_BLOCKS_PER_SM = bps
            assert torch.equal(reroute_numba(ids, sim, 1, RHO).cpu(), want)
            row.append(time_graph_replay(lambda: reroute_numba(ids, sim, 1, RHO), calls=100, repeats=20).median_us)
        print(f"two-launch grid T={T} {routing}: blocks/SM 4 16 64 256 -> " + " ".join(f"{x:.2f}" for x in row))
