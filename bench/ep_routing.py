"""Routing sources for the expert-parallel simulation (bench/ep_simulation.py): one MoE layer's
router output for D DP ranks of B tokens each, with the similarity SERE uses for that layer.

    src = routing_source("zipf:1.2", E=256, k=8)
    ids, sim = src.draw(D=8, B=16, draw=3)    # ids [D, B, k] int64, sim [E, E] float32

A draw is one (layer, step): its seed is the draw index, so stock, SERE per rank and SERE
global see the same tokens, and a fixed draw gives the same tokens for every D and B (the
first D*B tokens of one stream). Sources:
  uniform       every token picks k distinct experts uniformly (bench.routing.uniform_routing);
                similarity: bench.routing.synthetic_similarity, a new seed per draw (per layer).
  zipf:A        Zipf popularity over a seeded ranking of the experts, a new ranking per draw
                (per layer); the same synthetic similarity.
  grouped:G/M   uniform within DeepSeek-V3's group limit: the E experts form G groups of E/G,
                each token picks M groups uniformly, then k experts uniformly among them.
  trace         the zoo's qwen3_moe trace (bench/traces/, 128 experts, top-8, three layers,
                1024 recorded tokens each) with its calibrated (linear CKA) similarity. For
                E = 128 the trace's ids as recorded; for E = 256 a construction, not a
                measurement: expert e becomes 2e + c with an independent fair coin c per
                (token, slot), so every recorded expert splits into two equally popular halves
                and co-occurrence between pairs of halves is kept; the similarity of 2a+c to 2b+c'
                is sim[a, b], and of the two halves of one expert the mean off-diagonal entry of
                its row (not 1, which would make the halves perfect stand-ins for each other).
                A draw takes the trace layer draw % 3 and D*B rows of it, without replacement
                up to 1024 and then from fresh permutations (a row may repeat beyond 1024).
Index letters: D = ranks, B = tokens per rank, k = experts per token, E = experts, N = recorded
tokens, T = D*B.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.routing import synthetic_similarity, uniform_routing, zipf_routing
from sere.harness.traces import RoutingTrace, load_trace

TRACE_PATH = Path(__file__).resolve().parent / "traces" / "qwen3_moe.safetensors"


@dataclass(frozen=True)
class RoutingSource:
    """A named routing generator: `draw(D, B, draw)` -> (ids [D, B, k] int64, sim [E, E])."""

    label: str
    num_experts: int
    top_k: int
    similarity: str  # what SERE compares experts with, for the record
    make: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (T, draw) -> ids [T, k], sim

    def draw(self, D: int, B: int, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, sim = self.make(D * B, draw)
        return ids.view(D, B, self.top_k), sim


def grouped_ids(T: int, E: int, k: int, groups: int, per_token: int, *, seed: int) -> torch.Tensor:
    """[T, k] ids: each token picks `per_token` of `groups` equal expert groups uniformly,
    then k distinct experts uniformly among those groups' experts."""
    if E % groups or k > per_token * (E // groups):
        raise ValueError(f"cannot pick k={k} from {per_token} of {groups} groups of E={E}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(T, groups, generator=gen).topk(per_token, dim=-1).indices  # T, M
    allowed = torch.zeros(T, groups, dtype=torch.bool).scatter_(1, chosen, True)  # T, G
    allowed = allowed.repeat_interleave(E // groups, dim=1)  # T, E
    keys = torch.rand(T, E, generator=gen).masked_fill(~allowed, -1.0)  # T, E
    return keys.topk(k, dim=-1).indices  # T, k


def doubled_similarity(sim: torch.Tensor) -> torch.Tensor:
    """[2E, 2E] similarity of the split experts 2a+c (see the module docstring)."""
    E = sim.shape[0]
    off = ~torch.eye(E, dtype=torch.bool)
    twin = (sim * off).sum(1) / (E - 1)  # E: mean off-diagonal similarity of each row
    big = sim.repeat_interleave(2, 0).repeat_interleave(2, 1).clone()  # 2E, 2E
    a = torch.arange(E)
    big[2 * a, 2 * a + 1] = twin
    big[2 * a + 1, 2 * a] = twin
    big.fill_diagonal_(1.0)
    return big


def split_ids(ids: torch.Tensor, *, seed: int) -> torch.Tensor:
    """ids [T, k] over E experts -> over 2E: e -> 2e + coin, a fair coin per (token, slot)."""
    coin = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(seed))
    return 2 * ids.long() + coin


def trace_rows(n_pool: int, T: int, *, seed: int) -> torch.Tensor:
    """T row indices into a pool of n_pool: permutations of the pool, one after another."""
    gen = torch.Generator().manual_seed(seed)
    reps = -(-T // n_pool)
    return torch.cat([torch.randperm(n_pool, generator=gen) for _ in range(reps)])[:T]  # T


def routing_source(spec: str, E: int, k: int, *, trace: RoutingTrace | None = None) -> RoutingSource:
    """The source named by `spec` for E experts, top-k (see the module docstring)."""
    if spec == "uniform" or spec.startswith("zipf:"):
        alpha = 0.0 if spec == "uniform" else float(spec[len("zipf:"):])

        def make(T, draw):
            ids = (uniform_routing(T, E, k, seed=draw) if alpha == 0 else zipf_routing(T, E, k, alpha, seed=draw)).ids
            return ids, synthetic_similarity(E, seed=draw)

        return RoutingSource(spec, E, k, "synthetic (symmetric, uniform [0, 1), new per layer)", make)
    if spec.startswith("grouped:"):
        G, M = (int(x) for x in spec[len("grouped:"):].split("/"))
        return RoutingSource(spec, E, k, "synthetic (symmetric, uniform [0, 1), new per layer)",
                             lambda T, draw: (grouped_ids(T, E, k, G, M, seed=draw), synthetic_similarity(E, seed=draw)))
    if spec == "trace":
        trace = trace or load_trace(TRACE_PATH)
        if trace.top_k != k or E not in (trace.num_experts, 2 * trace.num_experts):
            raise ValueError(f"the trace has E={trace.num_experts}, k={trace.top_k}; cannot serve E={E}, k={k}")
        scale = E // trace.num_experts
        sims = {layer: trace.similarity[layer].float() for layer in trace.layers}
        if scale == 2:
            sims = {layer: doubled_similarity(s) for layer, s in sims.items()}

        def make(T, draw):
            layer = trace.layers[draw % len(trace.layers)]
            pool = trace.ids[layer]  # N, k
            ids = pool[trace_rows(pool.shape[0], T, seed=draw)].long()  # T, k
            return (split_ids(ids, seed=draw) if scale == 2 else ids), sims[layer]

        label = "trace" if scale == 1 else "trace x2"
        return RoutingSource(label, E, k, "the trace's calibrated linear CKA" + (" (doubled)" if scale == 2 else ""), make)
    raise ValueError(f"unknown routing {spec!r}; use 'uniform', 'zipf:A', 'grouped:G/M' or 'trace'")
