"""SERE under data-parallel attention + expert parallelism, simulated on the CPU (issue 15):
per decode step, the experts each EP rank streams, the slowest rank's expert bytes and the
all-to-all volume, for stock routing, SERE per DP rank and SERE with a global primary set.

    python -m bench.ep_simulation --out bench/results            # full sweep, ~2 min (one thread)
    python -m bench.ep_simulation --out /tmp/ep --tiny           # seconds: a smoke run

Writes OUT/ep_simulation.json (the rows), OUT/ep_simulation.md (findings, assumptions,
tables) and OUT/ep_simulation.png (bench/ep_report.py). The arithmetic of one layer is in
bench/ep_model.py, the routing in bench/ep_routing.py; every modelling assumption is listed in
the md. Each (model, routing, B, D) cell averages `draws` independent layers (more draws where
D*B is small, where one layer's numbers vary most); per-step numbers are the per-layer mean
times the model's MoE layers (a step's MoE time is the sum over layers of each layer's slowest
rank: the all-to-all of every layer synchronises the ranks).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from bench.ep_model import MODELS, EPModel, layer_metrics, sere_ids
from bench.ep_routing import routing_source


@dataclass(frozen=True)
class Sweep:
    """What to simulate. Settings are (S, rho); rho = 0 moves every secondary slot under the
    similarities used here (all of them are >= 0)."""

    models: tuple[str, ...] = tuple(MODELS)
    routings: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "DeepSeek-V3": ("uniform", "zipf:1.2", "grouped:8/4", "trace"),
        "Qwen3-235B-A22B": ("uniform", "zipf:1.2", "trace"),
    })
    batches: tuple[int, ...] = (1, 16, 64, 256)  # B, tokens per DP rank
    degrees: tuple[int, ...] = (2, 4, 8, 16, 32, 64)  # D = DP = EP
    # the main setting, S = 2, the paper's S = 2 rho = 0.1, and a threshold that leaves critical
    # experts under the synthetic similarity where a rank's primary set is small (B = 1)
    settings: tuple[tuple[int, float], ...] = ((1, 0.0), (2, 0.0), (2, 0.1), (1, 0.5))
    target_tokens: int = 2048  # draws per cell ~ target_tokens / (D*B), clamped to [min_draws, max_draws]
    min_draws: int = 6
    max_draws: int = 48
    draw_multiple: int = 3  # draws round up to a multiple of this: the trace's 3 layers weigh equally
    act_bytes: float = 2.0  # bytes per hidden element sent in dispatch / combine (bf16)

    def draws(self, D: int, B: int) -> int:
        n = max(self.min_draws, min(self.max_draws, self.target_tokens // (D * B)))
        return -(-n // self.draw_multiple) * self.draw_multiple


TINY = Sweep(routings={"DeepSeek-V3": ("uniform", "trace"), "Qwen3-235B-A22B": ("zipf:1.2",)},
             batches=(1, 4), degrees=(2, 8), settings=((1, 0.0), (2, 0.1)), target_tokens=16, min_draws=2, max_draws=2,
             draw_multiple=1)


def setting_name(S: int | None, rho: float | None) -> str:
    return "stock" if S is None else f"S={S} rho={rho:g}"


def _std_err(xs: list[float]) -> float:
    """Standard error of the mean over draws (0 for a single draw)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mu = sum(xs) / n
    return (sum((x - mu) ** 2 for x in xs) / (n - 1) / n) ** 0.5


def cell_rows(model: EPModel, source, B: int, D: int, sweep: Sweep) -> list[dict]:
    """The rows of one (model, routing, B, D) cell: stock, then per rank and global per setting."""
    E = model.num_experts
    cases = [(None, None, "stock")] + [(S, rho, scope) for S, rho in sweep.settings for scope in ("per_rank", "global")]
    acc = {c: [] for c in cases}
    n = sweep.draws(D, B)
    for draw in range(n):
        ids, sim = source.draw(D, B, draw)  # D, B, k; E, E
        for S, rho, scope in cases:
            acc[(S, rho, scope)].append(layer_metrics(sere_ids(ids, sim, S, rho, scope), E))
    rows = []
    for (S, rho, scope), ms in acc.items():
        def mean(f, ms=ms) -> float:  # over draws, i.e. layers
            return sum(f(m) for m in ms) / n

        tokens = D * B
        rows.append(dict(
            model=model.name, routing=source.label, B=B, D=D,
            setting=setting_name(S, rho), S=S, rho=rho, scope=scope, draws=n,
            experts_per_rank_mean=mean(lambda m: m.total_experts) / D,
            experts_slowest=mean(lambda m: m.slowest_rank_experts),
            experts_slowest_se=_std_err([m.slowest_rank_experts for m in ms]),
            experts_total=mean(lambda m: m.total_experts),
            copies_per_token_rank=mean(lambda m: m.copies_per_rank) / tokens,
            copies_per_token_expert=mean(lambda m: m.copies_per_expert) / tokens,
            copies_per_token_slot=mean(lambda m: m.copies_per_slot) / tokens,
            busiest_rank_copies=mean(lambda m: m.busiest_rank_copies),
            slowest_gb_step=mean(lambda m: m.slowest_rank_experts) * model.expert_bytes * model.moe_layers / 1e9,
            a2a_gb_step=mean(lambda m: m.copies_per_rank) * model.layer.hidden_size * sweep.act_bytes
            * model.moe_layers / 1e9,
        ))
    stock = rows[0]
    for r in rows:  # ratios inside one cell: same tokens, same draws; None where stock has none (D = 1)
        for name, col in (("slowest", "experts_slowest"), ("mean", "experts_per_rank_mean"),
                          ("a2a", "copies_per_token_rank"), ("busiest", "busiest_rank_copies")):
            r[f"{name}_vs_stock"] = r[col] / stock[col] if stock[col] else None
    return rows


def run(sweep: Sweep, *, progress: bool = True) -> tuple[list[dict], dict[str, str]]:
    """The rows of every cell, and the similarity each routing label was re-routed with."""
    cells = [(MODELS[m], spec, B, D) for m in sweep.models for spec in sweep.routings[m]
             for B in sweep.batches for D in MODELS[m].ep_degrees(sweep.degrees)]
    sources = {}
    rows = []
    for model, spec, B, D in tqdm(cells, desc="EP simulation", unit="cell", disable=not progress, mininterval=2):
        key = (model.name, spec)
        if key not in sources:
            sources[key] = routing_source(spec, model.num_experts, model.top_k)
        rows += cell_rows(model, sources[key], B, D, sweep)
    return rows, {src.label: src.similarity for src in sources.values()}


def _rounded(x):
    return float(f"{x:.5g}") if isinstance(x, float) else x


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """{"meta": ..., "rows": [...]}: one row per line, floats to 5 significant digits (keeps it < 1 MB)."""
    lines = [json.dumps({k: _rounded(v) for k, v in r.items()}, separators=(",", ":")) for r in rows]
    path.write_text('{"meta": ' + json.dumps(meta) + ',\n"rows": [\n' + ",\n".join(lines) + "\n]}\n")


def main(argv=None) -> None:
    from bench.ep_report import Assumptions, write_report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--tiny", action="store_true", help="a few small cells (smoke run)")
    ap.add_argument("--no-progress", action="store_true")
    Assumptions.add_arguments(ap)
    args = ap.parse_args(argv)
    sweep = TINY if args.tiny else Sweep()
    assumptions = Assumptions.from_args(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from threads; on a busy machine they spin
    try:
        start = time.perf_counter()
        rows, similarity = run(sweep, progress=not args.no_progress)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                sweep=asdict(sweep), assumptions=asdict(assumptions), seconds=round(elapsed, 1), similarity=similarity,
                models={name: dict(asdict(m), expert_bytes=m.expert_bytes) for name, m in MODELS.items()})
    write_json(args.out / "ep_simulation.json", meta, rows)
    paths = write_report(rows, meta, assumptions, args.out)
    print(f"{len(rows)} rows in {elapsed:.0f} s -> {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
