"""Device probe for the Numba reroute kernel: launch path, eager host overhead, and a sweep of
the launch shape (threads per block, lanes per secondary slot, grid cap) by CUDA-graph replay.

Run on a CUDA machine from the repo root: `python -m bench.lab.probe_kernel --out probe.json`
(bench/gpu/run_kernel.sh runs it before the kernel bench).
Inputs: E = 128, k = 8, rho = 0.1, uniform random routing, int64 ids, float32 similarity.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
from tqdm import tqdm

import sere
from bench.timing import time_graph_replay
from sere.kernels import numba_cuda as nc
from sere.kernels.reference import reroute_reference

E, K, RHO = 128, 8, 0.1
T_VALUES = (1, 16, 64, 256, 4096)
S_VALUES = (1, 2)
THREADS = (128, 256)
LANES = (8, 16, 32)
BLOCKS_PER_SM = (2, 4, 8)


def inputs(T: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices.cuda()  # T, k
    sim = torch.rand(E, E, generator=gen).cuda()  # E, E
    return ids, sim


def host_us_per_call(fn, calls: int = 2000) -> float:
    """Host time per call with no sync inside the loop: the eager cost a Python caller pays."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="probe.json")
    parser.add_argument("--quick", action="store_true", help="a small sweep (T 64/4096, S 1)")
    args = parser.parse_args()
    global T_VALUES, S_VALUES, BLOCKS_PER_SM, LANES
    if args.quick:
        T_VALUES, S_VALUES, BLOCKS_PER_SM, LANES = (64, 4096), (1,), (2, 4, 8), (16, 32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report: dict = {"device": torch.cuda.get_device_name(), "sms": sms, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    ids, sim = inputs(64)
    out = nc.reroute_numba(ids, sim, 1, RHO)
    torch.cuda.synchronize()
    kern = nc.pointer_kernel("int64", "float32", nc.columns_per_lane(E))
    report["launch_path"] = "cuda.core direct" if kern.direct is not None else f"numba fallback: {kern.fallback_reason}"
    regs = kern.compiled.regs_per_thread if hasattr(kern.compiled, "regs_per_thread") else None
    report["regs_per_thread"] = regs
    print("launch path:", report["launch_path"], "| regs/thread:", regs)
    np.testing.assert_array_equal(out.cpu().numpy(), reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), 1, RHO))

    ids32 = ids.int()
    pre_out = torch.empty_like(ids)
    host = {
        "reroute_numba (eager)": lambda: nc.reroute_numba(ids, sim, 1, RHO),
        "reroute_numba int32 ids": lambda: nc.reroute_numba(ids32, sim, 1, RHO),
        "torch.ops.sere.reroute": lambda: torch.ops.sere.reroute(ids, sim, 1, RHO),
        "sere.reroute(backend='numba')": lambda: sere.reroute(ids, sim, 1, RHO, backend="numba"),
        "launch_reroute (preallocated out)": lambda: nc.launch_reroute(ids, sim, pre_out, 1, RHO),
        "torch backend (eager)": lambda: sere.reroute(ids, sim, 1, RHO, backend="torch"),
        "torch.empty_like alone": lambda: torch.empty_like(ids),
    }
    report["host_us_per_call"] = {name: round(host_us_per_call(fn), 2) for name, fn in host.items()}
    for name, us in report["host_us_per_call"].items():
        print(f"host {name:38s} {us:8.2f} us/call")

    sweep = []
    configs = list(itertools.product(T_VALUES, S_VALUES, THREADS, LANES, BLOCKS_PER_SM))
    for T, S, threads, lanes, bps in tqdm(configs, desc="launch sweep", mininterval=5):
        ids, sim = inputs(T, seed=T)
        out = torch.empty_like(ids)
        want = reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), S, RHO) if (threads, lanes, bps) == (THREADS[0], LANES[0], BLOCKS_PER_SM[0]) else None
        nc.launch_reroute(ids, sim, out, S, RHO, threads=threads, lanes=lanes, max_blocks=bps * sms, two_launch=False)
        if want is not None:
            np.testing.assert_array_equal(out.cpu().numpy(), want)
        else:
            ref = torch.empty_like(ids)
            nc.launch_reroute(ids, sim, ref, S, RHO)
            assert torch.equal(out, ref), (T, S, threads, lanes, bps)
        timing = time_graph_replay(
            lambda: nc.launch_reroute(ids, sim, out, S, RHO, threads=threads, lanes=lanes, max_blocks=bps * sms, two_launch=False),
            calls=100, repeats=15,
        )
        sweep.append({"T": T, "S": S, "threads": threads, "lanes": lanes, "blocks_per_sm": bps,
                      "us": round(timing.median_us, 3)})
    report["sweep"] = sweep
    print("\nbest launch shape per (T, S), graph replay us per call (default: threads 256, lanes 32, 4 blocks/SM):")
    for T, S in itertools.product(T_VALUES, S_VALUES):
        rows = [r for r in sweep if r["T"] == T and r["S"] == S]
        best = min(rows, key=lambda r: r["us"])
        default = next(r for r in rows if (r["threads"], r["lanes"], r["blocks_per_sm"]) == (256, 32, 4))
        print(f"T={T:5d} S={S}: best {best['us']:7.3f} us (threads {best['threads']}, lanes {best['lanes']}, "
              f"{best['blocks_per_sm']}/SM)   default {default['us']:7.3f} us")
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
