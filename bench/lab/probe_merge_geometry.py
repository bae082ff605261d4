"""Device probe (issue 14, merge_slots): the merging kernel's block geometry at vLLM's small-batch
sizes, timed by CUDA-graph replay beside the plain kernel.

The merging kernel is one block: its secondary slots go to groups of `lanes` lanes in rounds of
threads / lanes, and a second round costs a row load after a barrier. On the H100 (2026-12-07,
E = 128, k = 8, 512 threads of 32-lane groups) it took 4.9 / 7.3 us at T = 1 / 4 against the plain
kernel's 2.5 / 2.6. This times each (threads, lanes) at T = 1..4 so `merge_geometry`'s choice (per T)
rests on a measurement; a geometry that does not launch (registers) is reported, not fatal.

    python -m bench.lab.probe_merge_geometry [--experts 128] [--top-k 8] [--tokens 1,2,3,4]
        (a CUDA machine, repo root)
"""
from __future__ import annotations

import argparse
import sys

import torch

GEOMETRIES = ((512, 32), (512, 16), (1024, 32), (256, 32), (256, 16))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", default="1,2,3,4")
    parser.add_argument("--select", type=int, default=1, help="S")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_merge_geometry: needs a CUDA device", file=sys.stderr)
        return 2
    from bench.timing import time_graph_replay
    from sere.kernels.numba_cuda import reroute_numba
    from sere.kernels.numba_launch import launch_reroute_merged, merge_geometry
    from sere.kernels.reference import merge_duplicate_slots_reference, reroute_reference

    E, k, S, rho = args.experts, args.top_k, args.select, 0.0
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(E, E, generator=gen).to(torch.bfloat16).cuda()
    picks = {T: merge_geometry(E, k, T, S) for T in map(int, args.tokens.split(","))}
    print(f"{torch.cuda.get_device_name()}: us per call, CUDA-graph replay, E={E} k={k} S={S} rho={rho} "
          f"bf16 similarity; merge_geometry picks (threads, lanes) {picks}")
    print("| T | plain kernel | " + " | ".join(f"{t} thr x {l} lanes" for t, l in GEOMETRIES) + " |")
    print("|---:|---:|" + "---:|" * len(GEOMETRIES))
    for T in map(int, args.tokens.split(",")):
        ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices.to(torch.int32).cuda()
        weights = torch.rand(T, k, generator=gen).sort(dim=1, descending=True).values.cuda()
        want = merge_duplicate_slots_reference(
            reroute_reference(ids.cpu().numpy(), sim.float().cpu().numpy(), S, rho), weights.cpu().numpy(), E)
        cells = [f"{time_graph_replay(lambda: reroute_numba(ids, sim, S, rho)).median_us:.2f}"]
        for threads, lanes in GEOMETRIES:
            out, w_out = torch.empty_like(ids), torch.empty_like(weights)
            run = lambda: launch_reroute_merged(ids, weights, sim, out, w_out, S, rho, threads=threads,  # noqa: E731
                                                lanes=lanes)
            try:
                run()
                torch.cuda.synchronize()
                if not (out.cpu().numpy() == want[0]).all() or not (w_out.cpu().numpy() == want[1]).all():
                    cells.append("WRONG")
                    continue
                cells.append(f"{time_graph_replay(run).median_us:.2f}")
            except Exception as err:  # a geometry that does not launch
                cells.append(f"no launch ({type(err).__name__})")
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)
    split_merge_cost(args, E, k, sim, gen)
    return 0


def split_merge_cost(args, E: int, k: int, sim, gen) -> None:
    """Where the merging kernel's extra microseconds go: at S = k (the identity: copy every slot)
    the two kernels differ only by the merge step (a barrier, the token's k slots compared, the
    weights written); at S the re-route part differs too (the slots staged, the weights loaded)."""
    from bench.timing import time_graph_replay
    from sere.kernels.numba_cuda import reroute_numba
    from sere.kernels.numba_launch import launch_reroute_merged

    print(f"\nThe merging kernel (merge_geometry's pick) against the plain kernel, us per call: at S = {k} (identity:"
          f" only the merge step differs) and at S = {args.select}")
    print(f"| T | plain, S={k} | merging, S={k} | difference | plain, S={args.select} | merging, S={args.select} | difference |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for T in map(int, args.tokens.split(",")):
        ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices.to(torch.int32).cuda()
        weights = torch.rand(T, k, generator=gen).sort(dim=1, descending=True).values.cuda()
        out, w_out = torch.empty_like(ids), torch.empty_like(weights)
        cells = []
        for S in (k, args.select):
            plain = time_graph_replay(lambda: reroute_numba(ids, sim, S, 0.0)).median_us  # noqa: B023
            merging = time_graph_replay(
                lambda: launch_reroute_merged(ids, weights, sim, out, w_out, S, 0.0)).median_us  # noqa: B023
            cells += [f"{plain:.2f}", f"{merging:.2f}", f"{merging - plain:+.2f}"]
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
