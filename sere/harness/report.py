"""Report of a MoE benchmark run: a table and plots from pytest-benchmark JSON.

    pytest bench/test_bench_layer.py --benchmark-json BENCH.json
    python -m sere.harness.report BENCH.json [MORE.json ...] [--out DIR]     # or: sere-report ...

Reads the stock-vs-SERE cases (those whose extra_info names a `setting`; a saved run under
.benchmarks/ works too): one MoE layer of bench/test_bench_layer.py (transformers) and
bench/test_bench_fused_moe.py (shown as "<model> (vllm-fused)"), and whole decode steps of
bench/test_bench_vllm_decode.py ("<model> (vllm-e2e)": the time is a step's, the experts are
means per MoE layer, the floor counts all the weights a step reads). It prints the device of each run, a table
(tabulate) of time, activated experts, GB/s, share of the HBM floor and speed-up against stock
and a legend of its columns, and writes into DIR (default: BENCH_report/ next to the first JSON):
  report.md                          device lines, the table (GitHub markdown), the legend and
                                     links to the plots (shown inline on GitHub)
  speedup_<model>_<routing>.png      speed-up against stock vs batch size, one line per setting
  experts_<model>_<routing>.png      activated experts vs batch size, one line per setting
Speed-ups are computed from the medians in the file (stock and SERE of the same model,
routing and batch, which the bench measures in one run), not taken on trust from extra_info.
Several JSON files (e.g. one per model, from separate runs) are merged; a speed-up still only
pairs cases of the same file, i.e. of the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("model", "routing", "T", "setting", "experts before", "experts after", "median us",
           "GB/s", "floor share", "speed-up")
LEGEND = (
    ("T", "tokens per call: the batch of one decode step"),
    ("setting", "stock = the model's own routing; S<s>-rho<r> = SERE keeping each token's top-s experts, "
                "threshold rho"),
    ("experts before / after", "distinct experts activated in the router's ids / after re-routing (one MoE layer; "
                               "vllm-e2e: mean per MoE layer and step)"),
    ("median us", "median time of one call (vllm-e2e: one decode step)"),
    ("GB/s", "bytes of expert weights read (vllm-e2e: every weight a step reads) / median time"),
    ("floor share", "HBM floor (those bytes / the measured copy bandwidth) / median time: 1 = at the memory floor"),
    ("speed-up", "stock median / this median, same model, routing and T of the same run"),
)
CPU_NOTE = ("CPU run: a smoke run. Its times do not model a GPU's memory bandwidth, so speed-ups can be below 1; "
            "the activated experts before / after hold on any device.")


@dataclass(frozen=True)
class LayerCase:
    model: str
    routing: str
    tokens: int
    setting: str
    experts_before: float | None  # None: not counted (the end-to-end bench without its counts engine)
    experts_after: float | None
    median_s: float | None  # None: the run had benchmarks disabled
    floor_bytes: int | None  # the bytes the HBM floor counts (a layer's expert weights; a step's weights)
    hbm_floor_us: float | None
    run: str = ""  # the file it came from: speed-ups pair cases of one run only

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.run, self.model, self.routing, self.tokens)


def model_label(info: dict) -> str:
    """The model column of a layer case: the model, and the layer implementation where it is not
    the transformers block (the fused vLLM layer of the same model is another case)."""
    layer = info.get("layer") or "transformers"
    return str(info["model"]) if layer == "transformers" else f"{info['model']} ({layer})"


class ReportError(ValueError):
    """The input cannot be reported on (missing, not benchmark JSON, no layer cases)."""


def _number(value) -> float | None:
    """An activated-expert count: an int for a layer case, a mean (float) or None end to end."""
    if value is None:
        return None
    out = float(value)
    if math.isnan(out):
        raise ValueError("NaN")
    return int(out) if out.is_integer() else out


def load_cases(path) -> list[LayerCase]:
    """The MoE-layer cases of a pytest-benchmark JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    cases = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "setting" not in info:
            continue  # another bench (kernel, calibration): not a layer case
        try:
            stats = bench.get("stats") or {}
            median = stats.get("median")
            if median is None and info.get("time_us") is not None:
                median = info["time_us"] / 1e6
            cases.append(LayerCase(
                model=model_label(info), routing=str(info["routing"]), tokens=int(info["tokens"]),
                setting=str(info["setting"]), experts_before=_number(info["experts_before"]),
                experts_after=_number(info["experts_after"]), median_s=None if median is None else float(median),
                floor_bytes=info.get("weight_bytes", info.get("expert_bytes")), hbm_floor_us=info.get("hbm_floor_us"),
                run=str(path),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: benchmark {bench.get('name')!r} has incomplete extra_info ({exc})") from None
    if not cases:
        raise ReportError(f"{path}: no MoE-layer cases (benchmarks with extra_info['setting']); "
                          "run bench/test_bench_layer.py with --benchmark-json")
    return cases


def device_line(path) -> str:
    """`<file>: <device>` from the JSON's machine_info (bench/conftest.py adds GPU facts under
    "sere"; pytest-benchmark's own cpu entry otherwise), with the run's date and commit."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    machine = data.get("machine_info") or {}
    sere = machine.get("sere") or {}
    if sere.get("gpu_name"):
        count = sere.get("gpu_count") or 1
        device = f"{sere['gpu_name']}" + (f" x{count}" if count > 1 else "")
        extra = [f"{sere['gpu_memory_gib']} GiB" if sere.get("gpu_memory_gib") else None,
                 f"CUDA {sere['cuda_runtime']}" if sere.get("cuda_runtime") else None,
                 f"driver {sere['gpu_driver']}" if sere.get("gpu_driver") else None]
        device += "".join(f", {e}" for e in extra if e)
    else:
        cpu = sere.get("cpu_model") or (machine.get("cpu") or {}).get("brand_raw")
        device = f"CPU {cpu}" if cpu else "unknown device (no machine_info in the file)"
        if cpu and (sere.get("cpu_count") or (machine.get("cpu") or {}).get("count")):
            device += f" ({sere.get('cpu_count') or machine['cpu']['count']} cores)"
    torch_version = (sere.get("versions") or {}).get("torch")
    when = data.get("datetime", "")[:19].replace("T", " ")
    commit = str((data.get("commit_info") or {}).get("id") or "")[:10]
    tail = "".join(f", {t}" for t in (f"torch {torch_version}" if torch_version else "",
                                      f"{when} UTC" if when else "", f"commit {commit}" if commit else "") if t)
    return f"{path.name}: {device}{tail}"


def is_cpu_run(path) -> bool:
    """Whether the run's machine_info names no GPU (a CPU smoke run)."""
    try:
        machine = json.loads(Path(path).read_text()).get("machine_info") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(machine) and not (machine.get("sere") or {}).get("gpu_name")


def speedups(cases: list[LayerCase]) -> dict[LayerCase, float | None]:
    """Stock median / case median, for cases whose stock case (same run, model, routing, T) is there."""
    stock = {c.key: c.median_s for c in cases if c.setting == "stock" and c.median_s}
    return {c: (stock[c.key] / c.median_s if c.key in stock and c.median_s else None) for c in cases}


def table_rows(cases: list[LayerCase]) -> list[list]:
    ratio = speedups(cases)
    rows = []
    for c in sorted(cases, key=lambda c: (c.model, c.routing, c.tokens, c.setting != "stock", c.setting)):
        us = None if c.median_s is None else c.median_s * 1e6
        gbps = None if us is None or c.floor_bytes is None else c.floor_bytes / c.median_s / 1e9
        share = None if us is None or c.hbm_floor_us is None else c.hbm_floor_us / us
        rows.append([c.model, c.routing, c.tokens, c.setting, c.experts_before, c.experts_after,
                     us, gbps, share, ratio[c]])
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def plot(cases: list[LayerCase], out: Path) -> list[Path]:
    """Two PNGs per (model, routing): speed-up vs T, activated experts vs T; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = speedups(cases)
    written = []
    for model, routing in sorted({(c.model, c.routing) for c in cases}):
        group = [c for c in cases if (c.model, c.routing) == (model, routing)]
        settings = sorted({c.setting for c in group}, key=lambda s: (s != "stock", s))
        for kind in ("speedup", "experts"):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for n, setting in enumerate(settings):  # colour by setting: the same in both plots
                pts = [(c.tokens, ratio[c] if kind == "speedup" else c.experts_after)
                       for c in group if c.setting == setting]
                pts = sorted((t, v) for t, v in pts if v is not None)
                if pts and not (kind == "speedup" and setting == "stock"):
                    ax.plot(*zip(*pts), marker="o", label=setting, color=f"C{n % 10}")
            if kind == "speedup":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_ylabel("speed-up vs stock (same run)")
            else:
                ax.set_ylabel("activated experts")
            ax.set_xscale("log", base=2)
            batches = sorted({c.tokens for c in group})
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
            ax.set_xlabel("batch size (tokens per decode step)")
            ax.set_title(f"{model}, routing {routing}", fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            path = out / f"{kind}_{_slug(model)}_{_slug(routing)}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def render(json_paths, out_dir=None) -> tuple[str, list[Path]]:
    """Write report.md and the plots for one or several JSON files; returns (the plain-text
    report: device lines, table and legend; paths written)."""
    from tabulate import tabulate

    paths = [Path(p) for p in ([json_paths] if isinstance(json_paths, (str, Path)) else json_paths)]
    cases = [c for p in paths for c in load_cases(p)]
    out = Path(out_dir) if out_dir else paths[0].with_name(paths[0].stem + "_report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create output folder {out}: {exc}") from None
    rows = table_rows(cases)
    fmt = dict(headers=COLUMNS, floatfmt=".3g", missingval="-")
    devices = [f"device: {device_line(p)}" for p in paths]
    notes = [CPU_NOTE] if any(is_cpu_run(p) for p in paths) else []
    plots = plot(cases, out)
    md = out / "report.md"
    title = ", ".join(p.name for p in paths)
    legend_md = "\n".join(f"- **{name}**: {text}" for name, text in LEGEND)
    links = "\n\n".join(f"![{p.stem}]({p.name})" for p in plots)
    md.write_text(
        f"# MoE layer benchmark: {title}\n\n" + "".join(f"{d}  \n" for d in devices) + "\n"
        + "".join(f"{n}\n\n" for n in notes)
        + f"{tabulate(rows, tablefmt='github', **fmt)}\n\n{legend_md}\n\n## Plots\n\n{links}\n"
    )
    legend_text = "\n".join(f"  {name}: {text}" for name, text in LEGEND)
    text = "\n".join([*devices, *notes, tabulate(rows, **fmt), "columns:", legend_text])
    return text, [md, *plots]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sere.harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="+", help="pytest-benchmark JSON (--benchmark-json, or a saved run)")
    parser.add_argument("--out", help="output folder (default: <BENCH>_report next to the JSON)")
    args = parser.parse_args(argv)
    try:
        text, paths = render(args.bench_json, args.out)
    except ReportError as exc:
        print(f"sere.harness.report: {exc}", file=sys.stderr)
        return 2
    print(text)
    print("\nwrote:\n" + "\n".join(f"  {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
