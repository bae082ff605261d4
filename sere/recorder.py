"""Activated-expert statistics per MoE layer and per step, kept on the device until read.

Framework-free (torch only): the transformers integration (`sere.hf`) and the vLLM plugin
both feed it. Each `record` call is one step of one layer (for `generate`: step 0 is the
prefill, then one step per decoded token). Values stay device tensors; nothing syncs with
the host until a read-out (`rows`, `per_layer`, `summary`), which costs one sync.

    rec = ExpertStatsRecorder()              # growable lists: eager code
    rec = ExpertStatsRecorder(capacity=4096) # fixed ring buffer per layer: CUDA-graph safe
    rec.preallocate(layers=[0, 1], device="cuda")  # before graph capture (ring mode)
    rec.record_stats(layer, reroute_stats, tokens=T)
    rec.summary()  # {layer: {"steps": n, "mean_experts_before": .., "mean_experts_after": ..}}
    print(rec)     # the same per layer as a small aligned table (rec.table(max_tokens=batch): decode steps only)

Fields per step: experts_before, experts_after (distinct valid experts in the router's ids and
in the ids after the transform), rerouted (slots whose id changed), critical (secondary slots
outside the primary set that stayed), tokens (tokens in the call). F = fields.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

FIELDS = ("experts_before", "experts_after", "rerouted", "critical", "tokens")


class ExpertStatsRecorder:
    """Per-layer, per-step routing statistics accumulated as device tensors.

    capacity=None: each record appends a [F] tensor to a list (eager use; unbounded).
    capacity=N: each layer owns an [N, F] int64 buffer and a device step counter; a record
    writes row (counter mod N) with index_copy_ and bumps the counter in place, so it can be
    captured in a CUDA graph and replayed (each replay records one more step). Only the last
    N steps of each layer are kept. Allocate before capture with `preallocate`.
    """

    def __init__(self, capacity: int | None = None):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")
        self.capacity = capacity
        self.enabled = True
        self._rows: dict[int, list[torch.Tensor]] = {}  # list mode: layer -> [F] per step
        self._buf: dict[int, torch.Tensor] = {}  # ring mode: layer -> [capacity, F]
        self._count: dict[int, torch.Tensor] = {}  # ring mode: layer -> 0-dim int64 steps seen

    # ---- writing (no host sync) ----------------------------------------------------------

    def preallocate(self, layers: Iterable[int], device) -> None:
        """Ring mode: allocate every layer's buffer now (needed before CUDA-graph capture)."""
        if self.capacity is None:
            raise ValueError("preallocate needs a recorder built with capacity=N")
        for layer in layers:
            self._ring_of(int(layer), torch.device(device))

    def record(
        self,
        layer: int,
        *,
        experts_before: torch.Tensor,
        experts_after: torch.Tensor,
        rerouted: torch.Tensor | None = None,
        critical: torch.Tensor | None = None,
        tokens: int | torch.Tensor = 0,
    ) -> None:
        """Record one step of `layer`. Tensor arguments are 0-dim integer tensors on one device;
        missing counts are stored as 0. `tokens` may be a Python int (filled on the device)."""
        if not self.enabled:
            return
        dev = experts_before.device
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        if not isinstance(tokens, torch.Tensor):
            # torch.full fills on the device: no host-to-device copy, so graph capture is fine.
            tokens = torch.full((), int(tokens), dtype=torch.int64, device=dev)
        parts = (experts_before, experts_after, rerouted if rerouted is not None else zero,
                 critical if critical is not None else zero, tokens)
        row = torch.stack([p.reshape(()).to(torch.int64) for p in parts])  # F
        layer = int(layer)
        if self.capacity is None:
            self._rows.setdefault(layer, []).append(row)
            return
        buf, count = self._ring_of(layer, dev)
        slot = count.remainder(self.capacity).reshape(1)  # 1
        buf.index_copy_(0, slot, row.reshape(1, -1))
        count.add_(1)

    def record_stats(self, layer: int, stats, *, tokens: int | torch.Tensor = 0) -> None:
        """Record a `sere.RerouteStats` (or any object with its four fields)."""
        self.record(
            layer,
            experts_before=stats.experts_before,
            experts_after=stats.experts_after,
            rerouted=stats.rerouted,
            critical=stats.critical,
            tokens=tokens,
        )

    @contextmanager
    def paused(self):
        """Record nothing inside the block (warm-up, calibration passes)."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def reset(self) -> None:
        """Forget every step. Ring buffers are kept (their counters zeroed in place, so a
        captured graph keeps writing into the same memory)."""
        self._rows.clear()
        for count in self._count.values():
            count.zero_()

    # ---- reading (one host sync per call) ------------------------------------------------

    def layers(self) -> list[int]:
        return sorted(set(self._rows) | set(self._buf))

    def _steps_tensors(self) -> dict[int, tuple[int, torch.Tensor]]:
        """layer -> (first step number, [n, F] tensor of the kept steps, oldest first)."""
        out: dict[int, tuple[int, torch.Tensor]] = {}
        for layer, rows in self._rows.items():
            if rows:
                out[layer] = (0, torch.stack(rows))  # n, F
        if self._buf:
            counts = torch.stack([self._count[layer] for layer in self._buf]).tolist()  # one sync
            for (layer, buf), n in zip(self._buf.items(), counts):
                if n == 0:
                    continue
                if n <= self.capacity:
                    out[layer] = (0, buf[:n])
                else:  # wrapped: the oldest kept step sits at n mod capacity
                    out[layer] = (n - self.capacity, buf.roll(-(n % self.capacity), dims=0))
        return out

    def per_layer(self) -> dict[int, dict[str, list[int]]]:
        """{layer: {"step": [...], field: [one value per step], ...}} for every field."""
        tensors = self._steps_tensors()
        if not tensors:
            return {}
        order = sorted(tensors)
        # One host copy for all layers together.
        flat = torch.cat([tensors[layer][1].cpu() for layer in order]).tolist()
        out, at = {}, 0
        for layer in order:
            first, t = tensors[layer]
            n = t.shape[0]
            cols = list(zip(*flat[at : at + n]))
            at += n
            entry = {"step": list(range(first, first + n))}
            entry.update({f: list(c) for f, c in zip(FIELDS, cols)})
            out[layer] = entry
        return out

    def rows(self) -> list[dict[str, int]]:
        """One dict per (layer, step): {"layer", "step", *FIELDS}; ready for pandas or csv."""
        table = []
        for layer, entry in self.per_layer().items():
            for i, step in enumerate(entry["step"]):
                table.append({"layer": layer, "step": step, **{f: entry[f][i] for f in FIELDS}})
        return table

    def num_steps(self, layer: int) -> int:
        """Steps kept for `layer` (ring mode: at most capacity)."""
        entry = self.per_layer().get(int(layer))
        return 0 if entry is None else len(entry["step"])

    def summary(self, *, min_tokens: int = 0, max_tokens: int | None = None) -> dict[int, dict[str, float]]:
        """Per layer: steps counted and mean experts before/after, over steps whose token count
        lies in [min_tokens, max_tokens] (e.g. max_tokens=batch to leave out the prefill)."""
        out = {}
        for layer, entry in self.per_layer().items():
            keep = [
                i for i, t in enumerate(entry["tokens"])
                if t >= min_tokens and (max_tokens is None or t <= max_tokens)
            ]
            out[layer] = {"steps": len(keep)}
            for f in ("experts_before", "experts_after", "rerouted", "critical"):
                out[layer][f"mean_{f}"] = sum(entry[f][i] for i in keep) / len(keep) if keep else float("nan")
        return out

    def table(self, *, min_tokens: int = 0, max_tokens: int | None = None) -> str:
        """summary() as a small aligned text table, one row per layer and a mean row
        (sere.stats.stats_table: tokens per step, experts before / after, share saved, moved
        and critical slots per token)."""
        from sere.stats import stats_table

        return stats_table(self, min_tokens=min_tokens, max_tokens=max_tokens)

    def __str__(self) -> str:
        """`print(handle.stats)`: the table over every recorded step."""
        return self.table()

    # ---- internals ---------------------------------------------------------------------

    def _ring_of(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._buf.get(layer)
        if buf is None:
            buf = torch.zeros(self.capacity, len(FIELDS), dtype=torch.int64, device=device)  # N, F
            self._buf[layer] = buf
            self._count[layer] = torch.zeros((), dtype=torch.int64, device=device)
        elif buf.device != device and not (buf.device.type == device.type and device.index is None):
            raise ValueError(f"layer {layer}: recorder buffer is on {buf.device}, stats came on {device}")
        return buf, self._count[layer]

    def __repr__(self) -> str:
        mode = "list" if self.capacity is None else f"ring(capacity={self.capacity})"
        return f"ExpertStatsRecorder({mode}, layers={self.layers()})"
