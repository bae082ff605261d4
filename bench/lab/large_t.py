"""Large-T bench of the Numba reroute kernel: one-launch vs two-launch path vs the research
baseline, CUDA-graph replay us per call, and the T*S threshold the numbers suggest.

Run on a CUDA machine from the repo root:
  `python -m bench.lab.large_t --out large_t.json`   (bench/lab/run_large_t.sh: with the GPU kernel tests)
Inputs: E = 128, k = 8, rho = 0.1, int64 ids, float32 similarity uniform in [0, 1); routing
"uniform" (each token takes k distinct experts at random: at large T every expert is primary)
and "narrow" (ids drawn from 6 experts: P stays small, so no row is skipped). Every path's
output is checked against the plain-loop reference before it is timed.
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

from bench.extra_info import markdown_table
from bench.timing import time_graph_replay
from sere.kernels import numba_cuda as nc
from sere.kernels.reference import reroute_reference
from sere.kernels.research_baseline import reroute_research_baseline

E, K, RHO = 128, 8, 0.1
T_VALUES = (64, 256, 1024, 2048, 4096)
S_VALUES = (1, 2)
ROUTINGS = ("uniform", "narrow")
PATHS = ("one", "two", "baseline")


def inputs(T: int, routing: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if routing == "uniform":
        ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices  # T, k
    else:
        ids = torch.randint(0, 6, (T, K), generator=gen)  # T, k: 6 experts only
    sim = torch.rand(E, E, generator=gen)  # E, E
    return ids.cuda(), sim.cuda()


def path_fn(path: str, ids, sim, out, S: int):
    if path == "baseline":
        return lambda: reroute_research_baseline(ids, sim, S, RHO)
    two = path == "two"
    return lambda: nc.launch_reroute(ids, sim, out, S, RHO, two_launch=two)


def suggest_threshold(rows) -> int | None:
    """Smallest measured T from which two launches are never slower than one (every S, routing)."""
    best = None
    for T in sorted({r["T"] for r in rows}, reverse=True):
        if all(r["two"] <= r["one"] for r in rows if r["T"] == T):
            best = T
        else:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="large_t.json")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "threshold_in_code": nc.TWO_LAUNCH_MIN_TOKENS, "rows": []}
    cases = list(itertools.product(ROUTINGS, T_VALUES, S_VALUES))
    for routing, T, S in tqdm(cases, desc="large-T bench", mininterval=5):
        ids, sim = inputs(T, routing, seed=T * 10 + S)
        want = reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), S, RHO)
        row = {"routing": routing, "T": T, "S": S}
        for path in PATHS:
            out = torch.empty_like(ids)
            fn = path_fn(path, ids, sim, out, S)
            got = fn() if path == "baseline" else (fn(), out)[1]
            np.testing.assert_array_equal(got.cpu().numpy(), want, err_msg=f"{path} T={T} S={S} {routing}")
            timing = time_graph_replay(fn, calls=100, repeats=20)
            row[path] = round(timing.median_us, 3)
            row[path + "_min"] = round(timing.min_us, 3)
        report["rows"].append(row)
    report["suggested_min_tokens"] = suggest_threshold(report["rows"])
    print(f"\n{report['device']}, {report['date']}; graph replay, median us per call (100 calls x 20 rounds)")
    rows = [[r["routing"], r["T"], r["S"], r["T"] * r["S"], f"{r['one']:.3f}", f"{r['two']:.3f}", f"{r['baseline']:.3f}",
             f"{r['one'] / r['two']:.2f}x", f"{r['baseline'] / r['two']:.2f}x"] for r in report["rows"]]
    print("\n".join(markdown_table(["routing", "T", "S", "T*S", "one-launch", "two-launch", "baseline", "two vs one",
                                    "two vs baseline"], "lrrrrrrrr", rows)))
    print(f"suggested TWO_LAUNCH_MIN_TOKENS: {report['suggested_min_tokens']}"
          f" (in code during this run: {report['threshold_in_code']})")
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
