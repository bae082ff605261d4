"""Expert-parallel arithmetic of one MoE layer in a decode step: which experts each EP rank
streams and how many token copies travel, for stock routing, SERE per DP rank and SERE with
a global primary set. Used by bench/ep_simulation.py (the sweep), tested in
tests/test_ep_simulation.py.

    ids = torch.randint(0, 256, (8, 16, 8))                 # D DP ranks, B tokens each, k slots
    out = sere_ids(ids, sim, S=1, rho=0.0, scope="global")  # or "per_rank"; "stock" = ids
    m = layer_metrics(out, num_experts=256)                 # LayerMetrics of plain floats

The setting modelled (DP attention + EP, DP = EP = D, the common serving layout):
- D ranks; rank d decodes its own batch of B tokens (ids[d]) and owns the contiguous block of
  experts [d*E/D, (d+1)*E/D) (vLLM's default linear placement, no redundant experts).
- EP rank r streams every expert of its block that any token of any DP rank is routed to.
- A (token, expert) pair whose expert lives on another rank than the token's DP rank travels
  (dispatch, and the same copies back in combine). Three counts of the copies:
    per_rank   one copy per distinct destination rank per token (DeepEP's normal kernels,
               which send a token once to a rank however many of its experts live there);
    per_expert one copy per distinct expert per token (DeepEP's low-latency kernels: a slot
               per (token, expert)), duplicates that SERE creates within a token collapsed;
    per_slot   one copy per top-k slot, duplicates kept (a dispatcher that never dedupes).
- SERE per rank: the contract on each DP rank's batch (primary set from its own B tokens).
  SERE global: the contract on all D*B tokens at once, which is exactly "primary set = union
  of every rank's top-S experts" (what an all-reduce of an E-wide mask gives each rank).
  `sere_ids_direct` calls sere.reroute on the tokens; `sere_ids` (what the sweep uses) gets the
  same ids from one sere.reroute call per primary set on E pseudo-tokens (`expert_map`).
Index letters: D = DP = EP ranks, B = tokens per DP rank, k = experts per token, E = experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import sere
from sere.harness.model_configs import LayerShapes

SCOPES = ("stock", "per_rank", "global")


@dataclass(frozen=True)
class EPModel:
    """The sizes a weight-streaming and all-to-all count needs, for one published model."""

    name: str
    layer: LayerShapes  # E, k, hidden H, moe_intermediate I of one MoE layer
    moe_layers: int  # decoder layers with routed experts
    layers: int  # all decoder layers (for the record)
    weight_bytes: float  # bytes per expert weight (1 = fp8, 2 = bf16)
    weight_dtype: str
    source: str  # where the numbers come from
    groups: tuple[int, int] | None = None  # group-limited routing: (groups, groups per token)

    @property
    def num_experts(self) -> int:
        return self.layer.num_experts

    @property
    def top_k(self) -> int:
        return self.layer.top_k

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert (gate, up, down); block scales of fp8 (< 0.03 %) left out."""
        return self.layer.expert_params() * self.weight_bytes

    def ep_degrees(self, wanted) -> list[int]:
        """The EP degrees of `wanted` that divide E (linear placement needs equal blocks)."""
        return [d for d in wanted if self.num_experts % d == 0]


# Published config.json values (hub pages deepseek-ai/DeepSeek-V3 and Qwen/Qwen3-235B-A22B).
# sere.harness.model_configs.REAL_MODELS holds whole transformers configs of the paper's
# three models, not these two; only the layer sizes matter here, so they live in this table.
MODELS: dict[str, EPModel] = {
    "DeepSeek-V3": EPModel(
        "DeepSeek-V3",
        LayerShapes("deepseek_v3", num_experts=256, top_k=8, hidden_size=7168, moe_intermediate_size=2048,
                    shared_intermediate_size=2048),
        moe_layers=58, layers=61, weight_bytes=1, weight_dtype="fp8 (as published)",
        source="config.json: n_routed_experts 256, num_experts_per_tok 8, hidden_size 7168, "
               "moe_intermediate_size 2048, num_hidden_layers 61, first_k_dense_replace 3, n_group 8, "
               "topk_group 4; weights fp8 e4m3",
        groups=(8, 4)),
    "Qwen3-235B-A22B": EPModel(
        "Qwen3-235B-A22B",
        LayerShapes("qwen3_moe", num_experts=128, top_k=8, hidden_size=4096, moe_intermediate_size=1536,
                    shared_intermediate_size=0),
        moe_layers=94, layers=94, weight_bytes=2, weight_dtype="bf16 (as published)",
        source="config.json: num_experts 128, num_experts_per_tok 8, hidden_size 4096, "
               "moe_intermediate_size 1536, num_hidden_layers 94, decoder_sparse_step 1, mlp_only_layers []"),
}


def expert_map(primary: torch.Tensor, sim: torch.Tensor, rho: float) -> torch.Tensor:
    """[E] long: where the contract sends a secondary slot holding expert e, given the primary
    set `primary` ([E] bool). The target depends only on (P, e), so `sere.reroute` runs once on
    E pseudo-tokens [p, e] whose slot 0 covers exactly P, instead of on every token."""
    E = sim.shape[0]
    members = primary.nonzero().squeeze(1)  # |P|
    every = torch.arange(E)  # E
    if members.numel() == 0:  # contract rule 4: an empty primary set changes nothing
        return every
    table = torch.stack([members[every % members.numel()], every], dim=1)  # E, 2
    return sere.reroute(table, sim, 1, rho, backend="torch")[:, 1]  # E


def sere_ids(ids: torch.Tensor, sim: torch.Tensor, S: int, rho: float, scope: str) -> torch.Tensor:
    """The ids [D, B, k] after `scope` ("stock", "per_rank" or "global") routing: slots 0..S-1
    kept, every other slot mapped through its primary set's `expert_map`. Equal to
    `sere_ids_direct` (tests/test_ep_simulation.py checks it), at O(D E^2) instead of O(D B k E)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    D, B, k = ids.shape
    if scope == "stock" or S <= 0 or S >= k:
        return ids
    E = sim.shape[0]
    primary = torch.zeros(D, E, dtype=torch.bool)  # D, E
    primary.scatter_(1, ids[:, :, :S].reshape(D, -1), True)
    if scope == "global":  # the all-reduce of the per-rank masks
        maps = expert_map(primary.any(0), sim, rho).expand(D, E)  # D, E
    else:
        maps = torch.stack([expert_map(primary[d], sim, rho) for d in range(D)])  # D, E
    sec = ids[:, :, S:]  # D, B, k-S
    moved = maps.gather(1, sec.reshape(D, -1)).view_as(sec)  # D, B, k-S
    return torch.cat([ids[:, :, :S], moved.to(ids.dtype)], dim=2)


def sere_ids_direct(ids: torch.Tensor, sim: torch.Tensor, S: int, rho: float, scope: str) -> torch.Tensor:
    """The reference for `sere_ids`: `sere.reroute` on each DP rank's batch (per rank) or on all
    D*B tokens at once (global: its primary set is the union over ranks)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == "stock":
        return ids
    D, B, k = ids.shape
    if scope == "global":
        return sere.reroute(ids.reshape(D * B, k), sim, S, rho, backend="torch").view(D, B, k)
    return torch.stack([sere.reroute(ids[d], sim, S, rho, backend="torch") for d in range(D)])  # D, B, k


@dataclass(frozen=True)
class LayerMetrics:
    """One MoE layer of one decode step. Experts are counts; copies are token copies sent
    off-rank in dispatch (combine sends the same number back)."""

    experts_per_rank: list[int]  # D, distinct experts each EP rank streams
    copies_per_rank: int  # all ranks, one copy per distinct destination rank per token
    copies_per_expert: int  # all ranks, one copy per distinct off-rank expert per token
    copies_per_slot: int  # all ranks, one copy per off-rank slot (no dedupe)
    busiest_rank_copies: int  # max over ranks of max(sent, received), per_rank model

    @property
    def slowest_rank_experts(self) -> int:
        return max(self.experts_per_rank)

    @property
    def total_experts(self) -> int:
        return sum(self.experts_per_rank)


def layer_metrics(ids: torch.Tensor, num_experts: int) -> LayerMetrics:
    """Experts streamed per EP rank and all-to-all copies for ids [D, B, k] (valid global ids;
    DP rank d holds ids[d]), under linear placement of `num_experts` over D ranks."""
    D, B, k = ids.shape
    E = num_experts
    if E % D:
        raise ValueError(f"linear placement needs D to divide E, got E={E}, D={D}")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < E):
        raise ValueError(f"ids must lie in [0, {E})")
    block = E // D
    ids = ids.long()
    used = torch.bincount(ids.reshape(-1), minlength=E) > 0  # E
    experts_per_rank = used.view(D, block).sum(1)  # D

    owner = ids // block  # D, B, k: the EP rank that holds each slot's expert
    home = torch.arange(D).view(D, 1, 1)  # D, 1, 1: each token's own (DP) rank
    off = owner != home  # D, B, k

    dest = torch.zeros(D, B, D, dtype=torch.bool)  # D(src), B, D(dst)
    dest.scatter_(2, owner, True)
    dest &= ~torch.eye(D, dtype=torch.bool).view(D, 1, D)  # a token's own rank costs no copy
    sent = dest.sum((1, 2))  # D
    received = dest.sum((0, 1))  # D

    srt, order = ids.sort(-1)  # D, B, k
    first = torch.ones_like(srt, dtype=torch.bool)  # D, B, k: first slot of each distinct expert
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    per_expert = (first & off.gather(-1, order)).sum()

    return LayerMetrics(
        experts_per_rank=experts_per_rank.tolist(),
        copies_per_rank=int(dest.sum()),
        copies_per_expert=int(per_expert),
        copies_per_slot=int(off.sum()),
        busiest_rank_copies=int(torch.maximum(sent, received).max()) if D else 0,
    )
