"""The settings grid and the search for the cheapest setting under a KL budget.

Grid syntax (`--settings`): space- or ';'-separated `name=values` terms, values comma-separated
or a range `start:stop:step` (stop included):
    "S=1,2 rho=0,0.1,0.2,0.4"      "S=1 rho=0:0.8:0.1"
Names: S (or select_top_k) and rho (or threshold). The grid is every (S, rho) pair.

The search (what `sere-tune` does, also written into the output's metadata):
  1. Grid: every (S, rho) measured, uniform over the MoE layers. Feasible means: mean KL per
     token within the budget at every batch size tuned for. The best uniform setting is the
     feasible one with the smallest share of the stock model's activated experts (mean over
     batch sizes of experts after / before; ties: the smaller KL).
  2. Per-layer settings (layers differ in how much re-routing they tolerate): a greedy descent
     from the best uniform setting along a ladder, the grid's (S, rho) pairs ordered from the
     gentlest to the most aggressive by their measured share of activated experts. Each round
     probes every layer one rung further alone (one measurement each), orders the probes that
     stay within the budget and save experts by experts saved per KL added, and applies them
     one after another on top of each other, each step measured as the whole setting and kept
     only if it stays within the budget and saves experts. Rounds repeat until no step is kept
     or the measurement budget (--search_evals) is spent. So per-layer rho, and S where the
     grid has several, can differ; the chosen setting's KL is a measurement, not an estimate.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from sere.harness.tune.measure import Measurement, Setting

DEFAULT_GRID = "S=1,2 rho=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
_NAMES = {"s": "S", "select_top_k": "S", "rho": "rho", "threshold": "rho"}

SEARCH_DESCRIPTION = (
    "grid of uniform (S, rho) settings, each measured; best uniform = fewest activated experts "
    "(share of stock, mean over batch sizes) with KL <= budget at every batch size; then greedy "
    "per-layer descent from it along the grid's (S, rho) pairs ordered by measured share: each round "
    "probes every layer one rung further, applies the feasible probes in order of experts saved per "
    "KL added, each step re-measured as a whole and kept only if within budget and cheaper"
)


class SearchError(ValueError):
    """A grid that cannot be read, or a budget that no setting meets."""


@dataclass(frozen=True)
class Grid:
    select_top_k: tuple[int, ...]
    threshold: tuple[float, ...]

    def settings(self) -> list[Setting]:
        return [Setting(s, r) for s in self.select_top_k for r in self.threshold]

    def describe(self) -> str:
        return f"S={','.join(map(str, self.select_top_k))} rho={','.join(f'{r:g}' for r in self.threshold)}"


def parse_grid(text: str) -> Grid:
    """'S=1,2 rho=0,0.2' -> Grid (see the module docstring for the syntax)."""
    values: dict[str, list[float]] = {}
    for term in re.split(r"[\s;]+", text.strip()):
        if not term:
            continue
        name, eq, rhs = term.partition("=")
        key = _NAMES.get(name.strip().lower())
        if not eq or key is None:
            raise SearchError(f"--settings: cannot read {term!r}; write e.g. \"S=1,2 rho=0,0.2,0.4\" (names: S, rho)")
        if key in values:
            raise SearchError(f"--settings gives {key} twice")
        values[key] = _values(rhs, key, term)
    if "rho" not in values:
        raise SearchError("--settings needs rho=... (thresholds), e.g. \"S=1,2 rho=0,0.2,0.4\"")
    s_values = values.get("S", [1.0])
    bad = [v for v in s_values if v != int(v) or v < 1]
    if bad:
        raise SearchError(f"--settings: S must be positive integers, got {bad}")
    return Grid(tuple(sorted({int(v) for v in s_values})), tuple(sorted(set(values["rho"]))))


def _values(rhs: str, key: str, term: str) -> list[float]:
    out: list[float] = []
    for part in rhs.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                start, stop, step = (float(x) for x in part.split(":"))
                if step <= 0 or stop < start:
                    raise ValueError
                count = int(math.floor((stop - start) / step + 1e-9)) + 1
                out.extend(round(start + i * step, 10) for i in range(count))
            else:
                out.append(float(part))
        except ValueError:
            raise SearchError(f"--settings: cannot read {key} values in {term!r} (numbers, or start:stop:step)") from None
    if not out or any(math.isnan(v) or math.isinf(v) for v in out):
        raise SearchError(f"--settings: {term!r} gives no finite values")
    return out


def best_feasible(measurements: Iterable[Measurement], budget: float) -> Measurement | None:
    ok = [m for m in measurements if m.within(budget)]
    return min(ok, key=lambda m: (m.share, m.kl)) if ok else None


def closest(measurements: Iterable[Measurement]) -> Measurement:
    """The setting nearest to any budget: the smallest KL (ties: fewer experts)."""
    return min(measurements, key=lambda m: (m.kl, m.share))


def ladder_of(grid: Iterable[Measurement]) -> list[tuple[int, float]]:
    """The grid's (S, rho) pairs from the gentlest to the most aggressive: by the measured share
    of activated experts, largest first; of pairs with the same share only the one with the
    smallest KL stays (a step must save experts). A per-layer step moves one layer one rung on."""
    ordered = sorted((m for m in grid if m.setting.uniform), key=lambda m: (-m.share, m.kl))
    out: list[tuple[int, float]] = []
    last_share = None
    for m in ordered:
        if last_share is not None and m.share >= last_share:
            continue
        out.append((m.setting.select_top_k, m.setting.threshold))
        last_share = m.share
    return out


class PerLayerSearch:
    """Greedy per-layer descent (see the module docstring), through `evaluate`, which measures a
    Setting; at most `max_evals` new measurements. `ladder`: (S, rho) pairs, gentlest first."""

    def __init__(self, evaluate: Callable[[Setting], Measurement], layers: list[int],
                 ladder: list[tuple[int, float]], budget: float, max_evals: int,
                 on_eval: Callable[[Measurement], None] | None = None, known: Iterable[Measurement] = ()):
        self.evaluate = evaluate
        self.layers = list(layers)
        self.ladder = [(int(S), float(rho)) for S, rho in ladder]
        self.budget = budget
        self.max_evals = max_evals
        self.on_eval = on_eval
        self.evals = 0
        self.cache: dict[Setting, Measurement] = {m.setting: m for m in known}  # measured already (the grid)
        self.path: list[Measurement] = []  # the kept steps, in order

    def _eval(self, setting: Setting) -> Measurement | None:
        if setting in self.cache:
            return self.cache[setting]
        if self.evals >= self.max_evals:
            return None
        self.evals += 1
        m = self.evaluate(setting)
        self.cache[setting] = m
        if self.on_eval is not None:
            self.on_eval(m)
        return m

    def _setting(self, rungs: dict[int, int]) -> Setting:
        return Setting.per_layer({layer: self.ladder[i] for layer, i in rungs.items()})

    def run(self, start: Measurement) -> Measurement:
        if len(self.ladder) < 2 or not self.layers or self.max_evals <= 0:
            return start
        rung_of = {pair: i for i, pair in enumerate(self.ladder)}
        try:
            rungs = {layer: rung_of[start.setting.of_layer(layer)] for layer in self.layers}
        except KeyError:
            return start  # the start is not on the ladder (cannot happen from the grid)
        last = len(self.ladder) - 1
        current = start
        self.cache.setdefault(start.setting, start)
        while self.evals < self.max_evals:
            probes = []
            for layer in self.layers:
                if rungs[layer] == last:
                    continue
                m = self._eval(self._setting({**rungs, layer: rungs[layer] + 1}))
                if m is None:
                    break
                saved, cost = current.share - m.share, m.kl - current.kl
                if m.within(self.budget) and saved > 0:
                    probes.append((saved / cost if cost > 0 else math.inf, layer))
            if not probes:
                break
            probes.sort(key=lambda p: (-p[0], p[1]))
            kept = False
            for _, layer in probes:
                trial = {**rungs, layer: rungs[layer] + 1}
                m = self._eval(self._setting(trial))
                if m is None:
                    break
                if m.within(self.budget) and m.share < current.share:
                    rungs, current, kept = trial, m, True
                    self.path.append(m)
            if not kept:
                break
        return current
