"""Routing statistics as device tensors (no host sync): what SERE did to one batch.

Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sere.kernels.vectorized import expert_mask, primary_mask


@dataclass(frozen=True)
class RerouteStats:
    """0-dim int64 tensors on the ids' device. Read them with `.item()` when a sync is fine."""

    experts_before: torch.Tensor  # distinct valid experts in the input ids
    experts_after: torch.Tensor  # distinct valid experts in the output ids
    rerouted: torch.Tensor  # slots whose id changed
    critical: torch.Tensor  # secondary slots kept because the best similarity was under rho

    def as_dict(self) -> dict[str, int]:
        """Host copy of every field (one sync)."""
        vals = torch.stack([self.experts_before, self.experts_after, self.rerouted, self.critical]).tolist()
        return dict(zip(("experts_before", "experts_after", "rerouted", "critical"), vals))


def distinct_experts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """0-dim int64: how many distinct valid expert ids appear anywhere in `ids`."""
    return expert_mask(ids, num_experts).sum()


def reroute_stats(
    topk_ids: torch.Tensor, new_ids: torch.Tensor, num_experts: int, select_top_k: int,
    primary: torch.Tensor | None = None,
) -> RerouteStats:
    """Statistics of one re-routing call, computed from its input and output ids. Critical
    slots are counted against `primary` [E] bool where P was given (primary_set "global"),
    else against the batch's own P."""
    T, k = topk_ids.shape
    E, S = num_experts, select_top_k
    rerouted = (new_ids != topk_ids).sum()
    if 0 < S < k:
        is_primary = primary_mask(topk_ids, E, S) if primary is None else primary  # E
        sec = topk_ids[:, S:]  # T, k-S
        sec_valid = (sec >= 0) & (sec < E)
        not_primary = sec_valid & ~is_primary[sec.clamp(0, E - 1).long()]
        # A secondary expert outside P that did not move is critical, unless P is empty
        # (then nothing could move and the call was the identity by rule 4).
        critical = (not_primary & (new_ids[:, S:] == sec)).sum() * is_primary.any()
    else:
        critical = torch.zeros((), dtype=torch.int64, device=topk_ids.device)
    return RerouteStats(
        experts_before=distinct_experts(topk_ids, E),
        experts_after=distinct_experts(new_ids, E),
        rerouted=rerouted,
        critical=critical,
    )


def stats_table(recorder, *, min_tokens: int = 0, max_tokens: int | None = None) -> str:
    """A sere.recorder.ExpertStatsRecorder as a small aligned text table (one host sync), one
    row per layer over the steps whose token count lies in [min_tokens, max_tokens] (as
    `summary` counts them; max_tokens=batch leaves the prefill of `generate` out):

      layer  steps  tokens/step  experts before  experts after  saved  moved/token  critical/token

    experts before / after: mean distinct experts per step in the router's ids and after the
    transform (what a decode step reads from memory); saved: 1 - after / before over those
    steps; moved/token and critical/token: slots re-routed, and secondary slots kept because
    no loaded expert was similar enough, per token. The last row is the mean over layers.
    `summary()` holds the same means unrounded, as a dict."""
    from tabulate import tabulate

    per_layer = recorder.per_layer()
    rows, totals = [], []
    for layer, entry in per_layer.items():
        keep = [i for i, t in enumerate(entry["tokens"])
                if t >= min_tokens and (max_tokens is None or t <= max_tokens)]
        if not keep:
            continue
        sums = {f: sum(entry[f][i] for i in keep) for f in ("experts_before", "experts_after", "rerouted",
                                                             "critical", "tokens")}
        totals.append((len(keep), sums))
        rows.append([layer, *_stats_cells(len(keep), sums)])
    if not rows:
        if max_tokens is None:
            window = f" with at least {min_tokens} tokens" if min_tokens > 0 else ""
        else:
            window = f" with {min_tokens} to {max_tokens} tokens"
        return f"no routing steps recorded{window}"
    if len(rows) > 1:
        mean_steps = sum(n for n, _ in totals) / len(totals)
        mean = {f: sum(s[f] / n for n, s in totals) / len(totals) for f in totals[0][1]}  # of the per-step means
        rows.append(["mean", *_stats_cells(1, mean, steps_label=f"{mean_steps:g}")])
    headers = ["layer", "steps", "tokens/step", "experts before", "experts after", "saved", "moved/token",
               "critical/token"]
    return tabulate(rows, headers=headers, colalign=("left",) + ("right",) * (len(headers) - 1), disable_numparse=True)


def _stats_cells(steps: int, sums: dict, *, steps_label: str | None = None) -> list[str]:
    """The cells after `layer` of one row: `sums` over `steps` steps."""
    before, after, tokens = sums["experts_before"] / steps, sums["experts_after"] / steps, sums["tokens"]
    saved = f"{1 - after / before:.1%}" if before else "-"

    def per_token(value):
        return f"{value / tokens:.2f}" if tokens else "-"

    return [steps_label or str(steps), f"{tokens / steps:.1f}", f"{before:.1f}", f"{after:.1f}", saved,
            per_token(sums["rerouted"]), per_token(sums["critical"])]
