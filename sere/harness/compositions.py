"""Batch compositions over several domains: which requests share a decode step.

    pool = window_pool({"kjv": ids_kjv, "pycode": ids_code, ...}, seq_len=128)
    batches = minority(pool, "pycode", "kjv", batch_size=16, num_batches=4)   # n, B, L
    ref = reference_pass(model, batches, Composition(16, 128, 64))

SERE's primary set is the union over the batch, so what a request loses depends on its
company. Four compositions, each [n, B, L] token ids ready for sere.harness.fidelity:
  one_domain  every request of a batch from the same domain;
  mixed       the B rows cycle through several domains (B / D of each per batch);
  minority    row 0 of every batch is a request of the minority domain (code, another
              language), rows 1..B-1 come from the majority domain: the case the paper's
              critical experts exist for (a lone request whose experts nobody else needs);
  minority_alone  the same row-0 requests, batched with B-1 requests of their own domain:
              the fair comparison for the minority row (same request, ordinary company).
Windows are non-overlapping, taken in order from each domain's held-out stream, so every
composition is deterministic; a domain with too few windows is an error.
"""
from __future__ import annotations

import torch


def window_pool(streams: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
    """{domain: [W_d, L]} non-overlapping windows of each 1-D token stream (tail dropped)."""
    out = {}
    for d, ids in streams.items():
        w = ids.numel() // seq_len
        if w == 0:
            raise ValueError(f"domain {d!r} has {ids.numel()} tokens: no window of {seq_len}")
        out[d] = ids[: w * seq_len].view(w, seq_len)
    return out


def _take(pool: dict[str, torch.Tensor], domain: str, start: int, count: int) -> torch.Tensor:
    if domain not in pool:
        raise ValueError(f"unknown domain {domain!r}; the pool has {', '.join(pool)}")
    win = pool[domain]
    if start + count > win.shape[0]:
        raise ValueError(f"domain {domain!r} has {win.shape[0]} windows of {win.shape[1]}, {start + count} needed")
    return win[start : start + count]


def one_domain(pool, domain: str, batch_size: int, num_batches: int, *, start: int = 0) -> torch.Tensor:
    """[n, B, L]: batches of one domain's consecutive windows."""
    return _take(pool, domain, start, batch_size * num_batches).view(num_batches, batch_size, -1)


def mixed(pool, domains: list[str], batch_size: int, num_batches: int) -> torch.Tensor:
    """[n, B, L]: row r of every batch from domains[r % D] (B must be a multiple of D)."""
    D = len(domains)
    if D == 0 or batch_size % D:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {D} domains {domains}")
    per = batch_size // D
    parts = [_take(pool, d, 0, per * num_batches).view(num_batches, per, -1) for d in domains]  # D x [n, per, L]
    rows = torch.stack(parts, dim=2)  # n, per, D, L
    return rows.reshape(num_batches, batch_size, -1)  # row r = domain r % D


def minority(pool, minority_domain: str, majority_domain: str, batch_size: int, num_batches: int) -> torch.Tensor:
    """[n, B, L]: row 0 = the minority domain's window b, rows 1.. = majority windows."""
    lone = _take(pool, minority_domain, 0, num_batches).view(num_batches, 1, -1)
    crowd = _take(pool, majority_domain, 0, (batch_size - 1) * num_batches).view(num_batches, batch_size - 1, -1)
    return torch.cat([lone, crowd], dim=1)


def minority_alone(pool, minority_domain: str, batch_size: int, num_batches: int) -> torch.Tensor:
    """[n, B, L]: the same row-0 requests as `minority`, rows 1.. from their own domain
    (windows after the first num_batches, so no request appears twice)."""
    lone = _take(pool, minority_domain, 0, num_batches).view(num_batches, 1, -1)
    own = _take(pool, minority_domain, num_batches, (batch_size - 1) * num_batches).view(num_batches, batch_size - 1, -1)
    return torch.cat([lone, own], dim=1)
