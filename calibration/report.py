"""Human-readable views of a layer -> [E, E] similarity dict: a summary table and a heatmap.

    print(summary_table(matrices))
    save_heatmap(matrices, "sere_similarity.png")     # heatmap_figure(matrices): the Figure itself
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

BEST_MATCH_THRESHOLDS = (0.1, 0.3, 0.5)


def summary_rows(matrices: dict[int, torch.Tensor]) -> list[dict[str, float | int]]:
    """Per layer: statistics of the off-diagonal similarities, and how many experts have a
    best match (most similar other expert) at or above each threshold in BEST_MATCH_THRESHOLDS."""
    rows = []
    for layer in sorted(matrices):
        sim = matrices[layer].double()
        e = sim.shape[0]
        off = ~torch.eye(e, dtype=torch.bool)
        vals = sim[off]  # E*(E-1)
        best = sim.masked_fill(~off, float("-inf")).max(dim=1).values if e > 1 else torch.zeros(1)  # E
        row = {"layer": layer}
        if vals.numel():
            row.update(
                mean=vals.mean().item(),
                std=vals.std(unbiased=False).item(),
                min=vals.min().item(),
                max=vals.max().item(),
                median=vals.median().item(),
            )
        for t in BEST_MATCH_THRESHOLDS:
            row[f"best>={t}"] = int((best >= t).sum()) if e > 1 else 0
        rows.append(row)
    return rows


def summary_table(matrices: dict[int, torch.Tensor]) -> str:
    from tabulate import tabulate

    return tabulate(summary_rows(matrices), headers="keys", floatfmt=".4f")


def heatmap_figure(matrices: dict[int, torch.Tensor], *, title: str = ""):
    """The heatmap as a matplotlib Figure (no pyplot): one [E, E] panel per layer on a grid,
    rows = the moved expert, columns = the target it may move onto (how the routing contract
    reads sim[e, :]); colour scale fixed to [0, 1] (to [-1, 1] when some value is negative, as
    the substitution method's can be). Grid cells without a layer are removed."""
    # A bare Figure (no pyplot) renders with Agg and leaves the user's backend alone.
    from matplotlib.figure import Figure

    layers = sorted(matrices)
    vmin = -1.0 if any(bool((matrices[layer] < 0).any()) for layer in layers) else 0.0
    cols = max(1, math.ceil(math.sqrt(len(layers))))
    rows = max(1, math.ceil(len(layers) / cols))
    fig = Figure(figsize=(2.8 * cols + 1.2, 2.8 * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    used = list(axes.flat)[: len(layers)]
    for ax in list(axes.flat)[len(layers) :]:
        fig.delaxes(ax)  # an empty cell, not a blank frame
    image = None
    for n, (ax, layer) in enumerate(zip(used, layers)):
        e = matrices[layer].shape[0]
        image = ax.imshow(matrices[layer].float().numpy(), vmin=vmin, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {layer}", fontsize=9)
        ticks = [0, e - 1] if e > 1 else [0]
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7, length=2)
        row, col = divmod(n, cols)
        if col == 0:
            ax.set_ylabel("moved expert (row)", fontsize=8)
        if row == rows - 1 or n + cols >= len(layers):  # the lowest panel of its column
            ax.set_xlabel("target expert (column)", fontsize=8)
    if image is not None:
        bar = fig.colorbar(image, ax=used, shrink=0.8)
        bar.set_label("similarity of row expert to column expert", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def save_heatmap(matrices: dict[int, torch.Tensor], path: str | Path, *, title: str = "") -> Path:
    """heatmap_figure written as a PNG."""
    path = Path(path)
    heatmap_figure(matrices, title=title).savefig(path, dpi=100, format="png")
    return path
