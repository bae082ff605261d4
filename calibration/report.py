"""Human-readable views of a layer -> [E, E] similarity dict: a summary table and a heatmap.

    print(summary_table(matrices))
    save_heatmap(matrices, "sere_similarity.png")
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


def save_heatmap(matrices: dict[int, torch.Tensor], path: str | Path, *, title: str = "") -> Path:
    """One [E, E] heatmap per layer on a grid, colour scale fixed to [0, 1] (to [-1, 1] when
    some value is negative, as the substitution method's can be); PNG."""
    # A bare Figure (no pyplot) renders with Agg and leaves the user's backend alone.
    from matplotlib.figure import Figure

    layers = sorted(matrices)
    vmin = -1.0 if any(bool((matrices[layer] < 0).any()) for layer in layers) else 0.0
    cols = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(2.6 * cols + 1, 2.6 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax, layer in zip(axes.flat, layers):
        image = ax.imshow(matrices[layer].float().numpy(), vmin=vmin, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    return path
