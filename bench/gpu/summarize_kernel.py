"""Markdown tables from a kernel-bench JSON (pytest-benchmark --benchmark-json of
bench/test_bench_reroute.py): per-call time of each backend and the numba ratios.

Run: `python -m bench.gpu.summarize_kernel bench_kernel.json > summary.md`
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

from bench.extra_info import markdown_table


def main(path: str) -> None:
    with open(path) as fh:
        data = json.load(fh)
    rows = defaultdict(dict)  # (method, routing, T, S) -> backend -> info
    failed = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "method" not in info:  # a case that failed after its timing: no case record to show
            failed.append(bench["name"])
            continue
        key = (info["method"], info["routing"], info["T"], info["S"])
        rows[key][info["backend"]] = info
    machine = data.get("machine_info", {})
    print(f"Source: {path}; {data.get('datetime', '')}; host {machine.get('node', '')}")
    if failed:
        print(f"Left out, failed after timing (no case record): {', '.join(failed)}")
    unsorted = sorted(k for k in rows if k[1].endswith("-unsorted"))
    fused_topk = sorted(k for k in rows if k[1] == "router-logits")
    merged = sorted(k for k in rows if k[1] == "uniform-merged")
    own_table = set(unsorted) | set(fused_topk) | set(merged)
    for method in ("graph", "events", "host"):
        keys = sorted(k for k in rows if k[0] == method and k not in own_table)
        if not keys:
            continue
        print(f"\n### {method}: median us per call (E=128, k=8, rho=0.1)\n")
        cells = []
        for key in keys:
            r = rows[key]
            any_info = next(iter(r.values()))
            experts = f"{any_info['experts_before']} -> {any_info['experts_after']}"
            us = {backend: r.get(backend, {}).get("us_per_call", "-") for backend in ("reference", "torch", "numba", "baseline")}
            if method == "host":
                cells.append([key[1], key[2], key[3], us["reference"], us["torch"], experts])
            else:
                numba = r.get("numba", {})
                floor = " / ".join(str(numba.get(f"{name}_launch_us_per_call", "-")) for name in ("empty", "copy", "gather")) \
                    if "empty_launch_us_per_call" in numba else "-"
                cells.append([key[1], key[2], key[3], us["numba"], floor, us["baseline"], us["torch"],
                              f"{numba.get('speedup_vs_baseline', '-')}x", f"{numba.get('speedup_vs_torch', '-')}x", experts])
        if method == "host":
            table = markdown_table(["routing", "T", "S", "reference", "torch (CPU)", "experts before -> after"],
                                   "lrrrrl", cells)
        else:
            table = markdown_table(["routing", "T", "S", "numba", "one-launch floor (empty / copy / gather)", "baseline", "torch",
                                    "numba vs baseline", "numba vs torch", "experts before -> after"],
                                   "lrrrrrrrrl", cells)
        print("\n".join(table))
    if unsorted:
        print("\n### unsorted slots (weights given): weight-order kernel vs sort + kernel + scatter, graph replay, us\n")
        cells = []
        for key in unsorted:
            fused = rows[key].get("numba_weight_order", {})
            cells.append([key[2], key[3], fused.get("us_per_call", "-"), fused.get("sort_path_us_per_call", "-"),
                          f"{fused.get('speedup_vs_sort_path', '-')}x"])
        print("\n".join(markdown_table(["T", "S", "weight-order kernel", "sort path", "speed-up"], "rrrrr", cells)))
    if fused_topk:
        print("\n### router top-k + re-routing: the fused kernel vs stock's top-k then the re-route kernel, graph replay, us\n")
        cells = []
        for key in fused_topk:
            f = rows[key].get("numba_fused_topk", {})
            m = rows[key].get("numba_fused_topk_merged", {})  # the merging variant, where timed
            two, stock = f.get("topk_then_reroute_us_per_call"), f.get("stock_topk_us_per_call")
            cells.append([key[2], key[3], f.get("us_per_call", "-"), two or "-", stock or "-",
                          f.get("added_over_stock_topk_us", "-"),
                          f"{two / f['us_per_call']:.2f}x" if two and f.get("us_per_call") else "-",
                          m.get("us_per_call", "-"), m.get("topk_then_merged_us_per_call", "-")])
        print("\n".join(markdown_table(["T", "S", "fused kernel", "top-k then re-route", "stock top-k alone",
                                         "fused minus stock top-k", "fused speed-up", "fused + merge",
                                         "top-k then merging kernel"], "rrrrrrrrr", cells)))
        chunks = [1, 2, 4, 8]  # tokens per block and round (topk_chunk_tokens picks one per T)
        by_chunk = [[key[2], key[3], *(rows[key]["numba_fused_topk"].get(f"chunk{c}_us_per_call", "-") for c in chunks)]
                    for key in fused_topk if "chunk1_us_per_call" in rows[key].get("numba_fused_topk", {})]
        if by_chunk:
            print("\n### the fused kernel by chunk (tokens a block takes per round), graph replay, us\n")
            print("\n".join(markdown_table(["T", "S", *(f"chunk {c}" for c in chunks)], "rr" + "r" * len(chunks),
                                            by_chunk)))

    if merged:
        print("\n### merged slots: the merging kernel (one block) vs the plain kernel, and plain + torch merge, graph replay, us\n")
        cells = []
        for key in merged:
            m = rows[key].get("numba_merged", {})
            cells.append([key[2], key[3], m.get("us_per_call", "-"), m.get("plain_kernel_us_per_call", "-"),
                          m.get("plain_then_torch_merge_us_per_call", "-"), m.get("merged_slots", "-")])
        print("\n".join(markdown_table(["T", "S", "merging kernel", "plain kernel", "plain + torch merge",
                                         "slots merged away"], "rrrrrr", cells)))


if __name__ == "__main__":
    main(sys.argv[1])
