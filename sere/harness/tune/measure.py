"""One SERE setting -> its metrics against the stock model, at fixed batch compositions.

    refs = {B: stock_reference(model, windows_B) for B in batch_sizes}    # once
    m = measure(model, sims, refs, Setting(1, 0.2))                       # per setting
    m.kl, m.share, m.per_batch[16].experts_after

The batch layout is sere.harness.fidelity's: a batch [B, L] of B far-apart windows runs
teacher-forced in one forward, and the routing transform sees one decode step at a time (the B
tokens at position t), which equals B sequences decoded together token by token. The settings
go in through `sere.hf.enable(model, sims, config=SereConfig.from_dict(setting))`, the same
parse as the JSON the tuner writes, with the per-step transform `StepwiseSere` in place of the
runtime's whole-call one; it is the contract applied to every step at once (one set of tensor
ops per layer instead of L calls), and tests/test_tune.py checks it against
`fidelity.PerStepTransform` around the runtime's transform on random inputs, bit for bit.

Metrics per batch size (all positions with a next token, all windows):
  kl              mean KL(stock || SERE) of the next-token distributions, nats per token;
  top1_agreement  share of positions where both models' most likely next token agree;
  ppl_ratio       exp(mean NLL SERE - mean NLL stock) on the text's next tokens;
  experts_before  mean distinct experts per decode step and MoE layer of the stock model;
  experts_after   the same after re-routing (per layer too).
Index letters: n = batches, B = batch, L = positions, V = vocabulary, T = tokens of one router
call, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sere.harness.fidelity import StepExpertCounter


# ---- the per-step transform -------------------------------------------------------------------


class StepwiseSere:
    """SERE's contract on every decode step of a teacher-forced [B, L] batch at once.

    Router ids [B*L, k] (row-major over [B, L]) are viewed as [L, B, k]; step t's primary set
    is the valid ids in slots 0..S-1 of its B tokens only, exactly as `route(ids[t])` per step.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float) -> torch.Tensor:
        T, k = topk_ids.shape
        B, S, E = self.batch_size, int(select_top_k), sim.shape[0]
        if T % B:
            raise ValueError(f"router saw {T} tokens, not a multiple of the batch size {B}")
        if S <= 0 or S >= k:
            return topk_ids.clone()
        L = T // B
        steps = topk_ids.view(B, L, k).transpose(0, 1)  # L, B, k
        valid = (steps >= 0) & (steps < E)  # L, B, k
        prim_idx = torch.where(valid[..., :S], steps[..., :S], torch.full_like(steps[..., :S], E))
        primary = torch.zeros(L, E + 1, dtype=torch.bool, device=topk_ids.device)
        primary.scatter_(1, prim_idx.reshape(L, B * S).long(), True)
        primary = primary[:, :E]  # L, E
        sec = steps[..., S:]  # L, B, k-S
        sec_safe = sec.clamp(0, E - 1).long()
        rows = sim.float()[sec_safe]  # L, B, k-S, E
        rows = rows.masked_fill(~primary[:, None, None, :], float("-inf"))
        best, target = rows.max(dim=-1)  # L, B, k-S (max gives the first maximum: smallest p)
        sec_is_primary = primary.gather(1, sec_safe.reshape(L, -1)).view_as(sec)
        move = valid[..., S:] & ~sec_is_primary & (best >= threshold) & (best > float("-inf"))
        out = steps.clone()
        out[..., S:] = torch.where(move, target.to(topk_ids.dtype), sec)
        return out.transpose(0, 1).reshape(T, k)


# ---- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """S and rho for every MoE layer, with per-layer (layer, S, rho) where a layer differs."""

    select_top_k: int
    threshold: float
    layer_settings: tuple[tuple[int, int, float], ...] = ()

    @classmethod
    def per_layer(cls, settings: dict[int, tuple[int, float]]) -> "Setting":
        """{layer: (S, rho)} -> a Setting whose global (S, rho) is the most common pair (ties:
        the gentler one, larger S then larger rho); the other layers become overrides."""
        counts: dict[tuple[int, float], int] = {}
        for pair in settings.values():
            counts[pair] = counts.get(pair, 0) + 1
        base = max(counts, key=lambda p: (counts[p], p))
        over = tuple(sorted((layer, int(S), float(rho)) for layer, (S, rho) in settings.items() if (S, rho) != base))
        return cls(int(base[0]), float(base[1]), over)

    def of_layer(self, layer: int) -> tuple[int, float]:
        for i, S, rho in self.layer_settings:
            if i == layer:
                return S, rho
        return self.select_top_k, self.threshold

    @property
    def uniform(self) -> bool:
        return not self.layer_settings

    def as_dict(self) -> dict:
        """The SERE settings (JSON-ready; layer keys as strings, as JSON has them; an override
        names only what differs from the global S and rho)."""
        d: dict = {"select_top_k": self.select_top_k, "threshold": self.threshold}
        if self.layer_settings:
            over = {}
            for layer, S, rho in self.layer_settings:
                o = {}
                if S != self.select_top_k:
                    o["select_top_k"] = S
                if rho != self.threshold:
                    o["threshold"] = rho
                over[str(layer)] = o
            d["layer_overrides"] = over
        return d

    def label(self) -> str:
        text = f"S={self.select_top_k} rho={self.threshold:g}"
        if self.layer_settings:
            text += " [" + " ".join(f"L{layer}:S={S},rho={rho:g}" for layer, S, rho in self.layer_settings) + "]"
        return text


# ---- the stock reference ---------------------------------------------------------------------


@dataclass
class StockReference:
    """The stock model on one batch size's windows: what every setting is compared with."""

    batch_size: int
    batches: torch.Tensor  # n, B, L token ids (CPU)
    logprobs: list[torch.Tensor]  # n x [B, L-1, V] float32 next-token log-probs, on the model's device
    nll: float  # mean next-token NLL
    experts: float  # mean distinct experts per decode step and MoE layer
    experts_per_layer: dict[int, float]

    @property
    def positions(self) -> int:
        return self.batches[:, :, 1:].numel()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch.to(_device_of(model))).logits  # B, L, V
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # B, L-1, V


def _nll_sum(logprobs: torch.Tensor, batch: torch.Tensor) -> float:
    targets = batch[:, 1:].to(logprobs.device)  # B, L-1
    return -float(logprobs.gather(-1, targets[..., None]).sum())


@torch.no_grad()
def stock_reference(model, batches: torch.Tensor) -> StockReference:
    """Run the unmodified model over `batches` [n, B, L] once."""
    B = batches.shape[1]
    counter = StepExpertCounter(model, B)
    try:
        lps = [_logprobs(model, b) for b in batches]
    finally:
        counter.remove()
    nll = sum(_nll_sum(lp, b) for lp, b in zip(lps, batches)) / batches[:, :, 1:].numel()
    return StockReference(B, batches, lps, nll, counter.mean(), counter.per_layer())


# ---- one setting -----------------------------------------------------------------------------


@dataclass
class BatchMetrics:
    batch_size: int
    kl: float
    top1_agreement: float
    ppl_ratio: float
    experts_before: float
    experts_after: float
    experts_after_per_layer: dict[int, float] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """experts_after / experts_before: the share of the stock model's expert reads left."""
        return self.experts_after / self.experts_before if self.experts_before else float("nan")

    def as_dict(self) -> dict:
        return {
            "kl": self.kl, "top1_agreement": self.top1_agreement, "ppl_ratio": self.ppl_ratio,
            "experts_before": self.experts_before, "experts_after": self.experts_after,
            "experts_after_per_layer": {str(k): v for k, v in self.experts_after_per_layer.items()},
        }


@dataclass
class Measurement:
    """A setting's metrics at every batch size tuned for."""

    setting: Setting
    per_batch: dict[int, BatchMetrics]
    stage: str = "grid"  # "grid" or "per-layer"

    @property
    def kl(self) -> float:
        """The worst batch size's mean KL: what the budget is checked against."""
        return max(m.kl for m in self.per_batch.values())

    @property
    def share(self) -> float:
        """Mean over batch sizes of experts_after / experts_before: what the search minimises."""
        return sum(m.share for m in self.per_batch.values()) / len(self.per_batch)

    def within(self, budget: float) -> bool:
        return self.kl <= budget

    def as_dict(self) -> dict:
        return {"setting": self.setting.as_dict(), "label": self.setting.label(), "stage": self.stage,
                "kl": self.kl, "experts_share": self.share,
                "per_batch": {str(b): m.as_dict() for b, m in sorted(self.per_batch.items())}}


@torch.no_grad()
def measure(model, sims: dict[int, torch.Tensor], refs: dict[int, StockReference], setting: Setting,
            *, stage: str = "grid") -> Measurement:
    """`setting`'s metrics against each stock reference (one batch size each)."""
    import sere.hf
    from sere.config import SereConfig

    config = SereConfig.from_dict(setting.as_dict(), source="sere-tune")
    per_batch = {}
    for B, ref in refs.items():
        handle = sere.hf.enable(model, sims, config=config, method=StepwiseSere(B))
        after = StepExpertCounter(model, B)  # after the hook: counts the re-routed ids
        try:
            nll_sum, agree, kl_sum = 0.0, 0, 0.0
            for batch, lp_ref in zip(ref.batches, ref.logprobs):
                lp = _logprobs(model, batch)  # B, L-1, V
                nll_sum += _nll_sum(lp, batch)
                agree += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
                kl_sum += float(torch.nn.functional.kl_div(lp, lp_ref, reduction="sum", log_target=True))
            experts_after, per_layer = after.mean(), after.per_layer()
        finally:
            after.remove()
            handle.remove()
        n = ref.positions
        per_batch[B] = BatchMetrics(B, kl_sum / n, agree / n, math.exp(nll_sum / n - ref.nll), ref.experts,
                                    experts_after, per_layer)
    return Measurement(setting, per_batch, stage)
