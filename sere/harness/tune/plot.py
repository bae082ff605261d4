"""The Pareto plot of a tuning run: mean KL per token against activated experts, every setting
measured (one colour per batch size), the budget as a line, the Pareto front joined, the chosen
setting marked. matplotlib is optional: `matplotlib_available()` says whether a plot can be made.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from sere.harness.tune.measure import Measurement


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (x, y) points no other point beats in both (smaller x and smaller y are better)."""
    front, best_y = [], float("inf")
    for x, y in sorted(points):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def pareto_plot(measurements: Sequence[Measurement], chosen: Measurement, budget: float, path: str | Path,
                *, title: str = "") -> Path:
    """Write the plot to `path` (PNG); needs matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    batch_sizes = sorted({b for m in measurements for b in m.per_batch})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
    for n, B in enumerate(batch_sizes):
        colour = colours[n % len(colours)]
        grid = [(m.per_batch[B].experts_after, m.per_batch[B].kl) for m in measurements
                if B in m.per_batch and m.stage == "grid"]
        layer = [(m.per_batch[B].experts_after, m.per_batch[B].kl) for m in measurements
                 if B in m.per_batch and m.stage != "grid"]
        stock = next(iter(m.per_batch[B].experts_before for m in measurements if B in m.per_batch))
        if grid:
            ax.scatter(*zip(*grid), s=22, color=colour, label=f"batch {B}: uniform (S, rho)")
        if layer:
            ax.scatter(*zip(*layer), s=22, color=colour, marker="^", alpha=0.55, label=f"batch {B}: per-layer (S, rho)")
        front = pareto_front(grid + layer)
        if len(front) > 1:
            ax.plot(*zip(*front), color=colour, linewidth=1, alpha=0.8)
        ax.axvline(stock, color=colour, linestyle=":", linewidth=1)
        c = chosen.per_batch[B]
        ax.scatter([c.experts_after], [c.kl], s=180, marker="*", color="red", edgecolor="black", zorder=5,
                   label="chosen" if n == 0 else None)
    ax.axhline(budget, color="grey", linestyle="--", linewidth=1, label=f"KL budget {budget:g}")
    ax.set_xlabel("activated experts per MoE layer and decode step (mean; dotted: stock)")
    ax.set_ylabel("mean KL(stock || SERE) per token, nats")
    ax.set_title(title or "sere-tune: quality against activated experts")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return Path(path)
