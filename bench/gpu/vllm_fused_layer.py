"""One MoE layer on vLLM's fused MoE kernel, stock routing vs SERE: the device script.

On a Hopper GPU (repo root; vLLM 0.26 bundle on PYTHONPATH, this package installed):
    python3 -m bench.gpu.vllm_fused_layer --out $OUT/fused
Argument check on any machine (no kernel runs):  python3 -m bench.gpu.vllm_fused_layer --list

The layer, its check and its numbers are bench/fused_layer.py's, the same as the pytest suite
bench/test_bench_fused_moe.py runs; here the paper's two settings and stock per (model,
routing, T), timed with bench/timing.py `time_graph_replay` (median of ROUNDS replays), under
one --deadline (cases left then are skipped and reported). A failed check is printed and
recorded, and the case is still timed. Each case is timed a second time without its routed
experts (bench/fused_layer.py parts_info): "rest us" is router, top-k, SERE and shared expert,
"experts us" the difference, with the routed experts' own byte floor share.
Results: $OUT/vllm_fused_layer.json and $OUT/vllm_fused_layer.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

from bench import fused_layer as fused
from bench.extra_info import StockTimes, markdown_table
from bench.routing import make_routing
from bench.timing import Deadline, measure_copy_bandwidth, time_graph_replay
from sere.harness.model_configs import REAL_MODELS
from sere.harness.settings import DECODE_BATCHES, STOCK_AND_PAPER


def run_case(layer: fused.FusedLayer, model: str, routing: str, T: int, setting, bw: float, stock: StockTimes) -> dict:
    case = fused.prepare_case(layer, routing, T, *setting)
    err, problems = fused.check_case(layer, case)  # check first, then time
    for msg in problems:
        print(f"CHECK FAILED {model} {routing} T={T} {setting.label}: {msg}", flush=True)
    with torch.no_grad():
        timing = time_graph_replay(lambda: layer(case.h), calls=fused.CALLS, repeats=fused.ROUNDS)
        rest = time_graph_replay(lambda: layer(case.h, experts=False), calls=fused.CALLS, repeats=fused.ROUNDS)
    seconds = timing.median_us * 1e-6
    speedup = stock.speedup_vs_stock((model, routing, T), seconds, stock=setting.is_stock)
    info = fused.case_info(layer.shapes, case, seconds, bw)
    return dict(model=model, tokens=T, setting=setting.label, S=setting.S, rho=setting.rho, **info,
                **fused.parts_info(layer.shapes, info["experts_after"], seconds, rest.median_us * 1e-6, bw),
                time_min_us=round(timing.min_us, 2), check_rel_err=round(err, 5), check_failed=problems,
                speedup_vs_stock=speedup)


def markdown(rows: list[dict]) -> str:
    lines = []
    for (model, routing), group in itertools.groupby(rows, key=lambda r: (r["model"], r["routing"])):
        cells = []
        for r in group:
            if r.get("error"):
                cells.append([r["tokens"], r["setting"], f"ERROR: {r['error'][:80]}", "", "", "", "", ""])
                continue
            sp = "" if r["speedup_vs_stock"] is None else f"{r['speedup_vs_stock']:.2f}x"
            sp += " CHECK FAILED" if r.get("check_failed") else ""
            share = r.get("experts_floor_share")
            cells.append([r["tokens"], r["setting"], f"{r['experts_before']} -> {r['experts_after']}",
                          f"{r['time_us']:.1f}", f"{r['gbps']:.0f}", f"{r['hbm_floor_us']:.1f}",
                          f"{r['hbm_floor_share']:.2f}", f"{r['rest_us']:.1f}",
                          f"{r['experts_us']:.1f}", "-" if share is None else f"{share:.2f}", sp])
        lines += [f"#### {model}, routing `{routing}`", ""]
        lines += markdown_table(["T", "setting", "experts before -> after", "us", "GB/s", "floor us", "floor share",
                                 "rest us", "experts us", "experts floor share", "vs stock"], "rllrrrrrrrr", cells)
        lines.append("")
    return "\n".join(lines)


def plan(models, routings, batches):
    """(model, routing, T, setting) of every case; stock first in each (model, routing, T)."""
    return [(m, rt, T, s) for m in models for rt in routings for T in batches for s in STOCK_AND_PAPER]


def parse_models(p: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated --models, each one of REAL_MODELS (else a usage error)."""
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in REAL_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(REAL_MODELS)}")
    return models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vllm_fused_layer")))
    p.add_argument("--models", default=",".join(REAL_MODELS), help="comma-separated, from sere.harness.model_configs.REAL_MODELS")
    p.add_argument("--routings", default=",".join(fused.ROUTINGS), help="bench/routing.py specs")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(DECODE_BATCHES))
    p.add_argument("--deadline", type=float, default=600, help="seconds; cases left then are skipped and reported")
    p.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = p.parse_args(argv)
    models = parse_models(p, args.models)
    routings = [s.strip() for s in args.routings.split(",") if s.strip()]
    for spec in routings:
        make_routing(spec, 2, 8, 2)  # a bad spec fails here, not after minutes of GPU work
    if any(T < 1 for T in args.batches):
        p.error("batches must be >= 1")
    cases = plan(models, routings, args.batches)
    if args.list:
        for m, rt, T, s in cases:
            print(m, rt, T, s.label, s.S, s.rho)
        print(f"{len(cases)} cases")
        return 0

    vllm_ops = fused.load_vllm_ops()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.deadline)
    bw = measure_copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; {len(cases)} cases", flush=True)
    rows, stock, skipped = [], StockTimes(), []
    from tqdm import tqdm

    for model in models:
        layer = fused.build_layer(model, vllm_ops)
        for case in tqdm([c for c in cases if c[0] == model], desc=model, file=sys.stdout, mininterval=5):
            if deadline.refuses():
                skipped.append(case)
                continue
            try:
                rows.append(run_case(layer, *case, bw=bw, stock=stock))
            except Exception as exc:  # noqa: BLE001 - one broken case must not cost the rest of the device run
                import traceback

                traceback.print_exc()
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a broken context shows in the next case's error
                    pass
                m, rt, T, s = case
                rows.append(dict(model=m, routing=rt, tokens=T, setting=s.label, S=s.S, rho=s.rho,
                                 error=f"{type(exc).__name__}: {exc}"))
        del layer
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "copy_bw_gbps": round(bw / 1e9, 1), "copies": fused.COPIES, "calls_per_graph": fused.CALLS,
                  "rounds": fused.ROUNDS, "rows": rows,
                  "skipped": [[m, rt, T, s.label, s.S, s.rho] for m, rt, T, s in skipped]}
        (args.out / "vllm_fused_layer.json").write_text(json.dumps(result, indent=2))  # partial results survive
    try:
        import vllm

        result["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - the version is a label only
        pass
    (args.out / "vllm_fused_layer.json").write_text(json.dumps(result, indent=2))
    table = markdown(rows)
    (args.out / "vllm_fused_layer.md").write_text(table)
    print(table)
    if skipped:
        print(f"{len(skipped)} cases skipped at --deadline {args.deadline:.0f} s", flush=True)
    print(f"done in {deadline.elapsed():.0f} s", flush=True)
    bad = [r for r in rows if r.get("error") or r.get("check_failed")]
    if bad:
        print(f"{len(bad)} cases failed their check or raised (see CHECK FAILED / ERROR above)", flush=True)
    return 1 if skipped or bad else 0


if __name__ == "__main__":
    sys.exit(main())
