"""The reroute kernels over their edge shapes, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --report-api-errors no python3 -m bench.gpu.sanitize_kernel
    compute-sanitizer --tool racecheck python3 -m bench.gpu.sanitize_kernel --quick
(bench/gpu/run_kernel_gate.sh runs both and reads their summaries.) `--report-api-errors no`:
numba-cuda probes the driver with calls that fail harmlessly, which memcheck would report.

Every case runs on the GPU and is checked against the plain-loop reference (a wrong id exits 1),
so the sanitizer sees each kernel path with valid and invalid inputs: T = 1, odd E, E = 1024,
-1 / >= E ids, S = 0 / k, the two-launch path (T >= the shape rule's threshold and forced),
int32 and int64 ids, float32 / float16 / bfloat16 similarities, the weight-order kernel
(unsorted slots), the merging kernel (one block: re-route, then duplicate slots merged, sorted and
unsorted slots; ids and weights), the fused router top-k + re-route kernel (its ids from float32 /
float16 / bfloat16 logits with ties; its merging variant at T <= 8), and the research-structure baseline.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from sere.kernels.numba_cuda import (launch_reroute, reroute_numba, reroute_numba_in_weight_order, reroute_numba_merged,
                                     topk_reroute_numba)
from sere.kernels.numba_topk_op import MERGE_MAX_TOKENS
from sere.kernels.reference import (merge_duplicate_slots_reference, reroute_reference, reroute_reference_in_weight_order,
                                    topk_reroute_reference)
from sere.kernels.research_baseline import reroute_research_baseline

# (T, E, k, S): T = 1, odd E, the largest E, S out of range, large T (two launches).
CASES = [(1, 8, 4, 1), (1, 61, 8, 2), (7, 7, 4, 0), (7, 7, 4, 4), (33, 61, 6, 3), (16, 1024, 8, 1),
         (256, 128, 8, 2), (1500, 60, 4, 1)]
QUICK = [(1, 61, 8, 2), (33, 61, 6, 3), (16, 1024, 8, 1), (1500, 60, 4, 1)]
ID_DTYPES = (torch.int32, torch.int64)
SIM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def inputs(gen, T, E, k, id_dtype, sim_dtype):
    ids = gen.integers(0, E, size=(T, k))
    bad = gen.random((T, k)) < 0.1
    ids[bad] = gen.choice(np.array([-1, E, E + 9]), size=int(bad.sum()))  # invalid ids pass through
    sim = torch.from_numpy(gen.uniform(-0.5, 1.0, size=(E, E)).astype(np.float32)).to(sim_dtype)
    weights = torch.from_numpy((gen.integers(1, 6, size=(T, k)) / 8).astype(np.float32))  # ties
    return torch.from_numpy(ids).to(id_dtype).cuda(), sim.cuda(), weights.cuda()


def run(cases) -> int:
    gen = np.random.default_rng(0)
    failures = 0
    for n, (T, E, k, S) in enumerate(cases):
        ids, sim, weights = inputs(gen, T, E, k, ID_DTYPES[n % 2], SIM_DTYPES[n % 3])
        ids_np, sim32 = ids.cpu().numpy(), sim.float().cpu().numpy()
        want = reroute_reference(ids_np, sim32, S, 0.1)
        runs = {"numba": reroute_numba(ids, sim, S, 0.1), "baseline": reroute_research_baseline(ids, sim, S, 0.1)}
        for two, build in ((False, None), (True, "block"), (True, "scatter")):
            out = torch.empty_like(ids)
            launch_reroute(ids, sim, out, S, 0.1, two_launch=two, flags_build=build)
            runs[f"numba two_launch={two}{'' if build is None else ' ' + build}"] = out
        want_w = reroute_reference_in_weight_order(ids_np, weights.cpu().numpy(), sim32, S, 0.1)
        got_w = reroute_numba_in_weight_order(ids, weights, sim, S, 0.1)
        torch.cuda.synchronize()
        for name, got in runs.items():
            ok = np.array_equal(got.cpu().numpy(), want)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:30s} T={T} E={E} k={k} S={S} {ids.dtype} {sim.dtype}")
        ok = np.array_equal(got_w.cpu().numpy(), want_w)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {'weight-order':30s} T={T} E={E} k={k} S={S} {ids.dtype} {sim.dtype}")
        for in_order, want_ids in ((False, want), (True, want_w)):
            m_ids, m_w = reroute_numba_merged(ids, weights, sim, S, 0.1, in_order)
            torch.cuda.synchronize()
            r_ids, r_w = merge_duplicate_slots_reference(want_ids, weights.cpu().numpy(), E)
            ok = np.array_equal(m_ids.cpu().numpy(), r_ids) and np.array_equal(m_w.cpu().numpy(), r_w)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {'merged' + (' weight-order' if in_order else ''):30s} "
                  f"T={T} E={E} k={k} S={S} {ids.dtype} {sim.dtype}")
        failures += run_fused_topk(gen, T, E, k, S, ids.dtype, sim, SIM_DTYPES[(n + 1) % 3])
    return failures


def run_fused_topk(gen, T, E, k, S, id_dtype, sim, logit_dtype) -> int:
    """The fused top-k kernel on logits of the case's shape (a coarse grid: ties among logits)."""
    logits = torch.from_numpy((gen.integers(-6, 7, size=(T, E)) / 4).astype(np.float32)).to(logit_dtype).cuda()
    _, ids = topk_reroute_numba(logits, sim, k, True, S, 0.1, ids_dtype=id_dtype)
    torch.cuda.synchronize()
    ref_w, want = topk_reroute_reference(logits.float().cpu().numpy(), k, True, sim.float().cpu().numpy(), S, 0.1)
    ok = np.array_equal(ids.long().cpu().numpy(), want)
    print(f"{'ok  ' if ok else 'FAIL'} {'fused top-k':22s} T={T} E={E} k={k} S={S} {id_dtype} {logits.dtype}")
    failures = int(not ok)
    if T <= MERGE_MAX_TOKENS:  # the merging variant (one block): top-k, re-route and merge
        m_w, m_ids = topk_reroute_numba(logits, sim, k, True, S, 0.1, ids_dtype=id_dtype, merge=True)
        torch.cuda.synchronize()
        r_ids, r_w = merge_duplicate_slots_reference(want, ref_w.astype(np.float32), E)
        ok = np.array_equal(m_ids.long().cpu().numpy(), r_ids) and np.allclose(m_w.cpu().numpy(), r_w, rtol=2e-6, atol=1e-7)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {'fused top-k merged':22s} T={T} E={E} k={k} S={S} {id_dtype} {logits.dtype}")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cases (racecheck is slow)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_kernel: needs a CUDA GPU", file=sys.stderr)
        return 2
    failures = run(QUICK if args.quick else CASES)
    print(f"sanitize_kernel: {failures} wrong result(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
