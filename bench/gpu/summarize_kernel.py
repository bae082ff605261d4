"""Markdown tables from a kernel-bench JSON (pytest-benchmark --benchmark-json of
bench/test_bench_reroute.py): per-call time of each backend and the numba ratios.

Run: `python bench/gpu/summarize_kernel.py bench_kernel.json > summary.md`
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as fh:
        data = json.load(fh)
    rows = defaultdict(dict)  # (method, routing, T, S) -> backend -> info
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["method"], info["routing"], info["T"], info["S"])
        rows[key][info["backend"]] = info
    machine = data.get("machine_info", {})
    print(f"Source: {path}; {data.get('datetime', '')}; host {machine.get('node', '')}")
    for method in ("graph", "events", "host"):
        keys = sorted(k for k in rows if k[0] == method)
        if not keys:
            continue
        print(f"\n### {method}: median us per call (E=128, k=8, rho=0.1)\n")
        if method == "host":
            print("| routing | T | S | reference | torch (CPU) | experts before -> after |")
            print("|---|---:|---:|---:|---:|---|")
            for key in keys:
                r = rows[key]
                any_info = next(iter(r.values()))
                print(f"| {key[1]} | {key[2]} | {key[3]} | {r.get('reference', {}).get('us_per_call', '-')} | "
                      f"{r.get('torch', {}).get('us_per_call', '-')} | "
                      f"{any_info['experts_before']} -> {any_info['experts_after']} |")
            continue
        print("| routing | T | S | numba | baseline | torch | numba vs baseline | numba vs torch | experts before -> after |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for key in keys:
            r = rows[key]
            numba = r.get("numba", {})
            any_info = next(iter(r.values()))
            print(f"| {key[1]} | {key[2]} | {key[3]} | {numba.get('us_per_call', '-')} | "
                  f"{r.get('baseline', {}).get('us_per_call', '-')} | {r.get('torch', {}).get('us_per_call', '-')} | "
                  f"{numba.get('speedup_vs_baseline', '-')}x | {numba.get('speedup_vs_torch', '-')}x | "
                  f"{any_info['experts_before']} -> {any_info['experts_after']} |")


if __name__ == "__main__":
    main(sys.argv[1])
