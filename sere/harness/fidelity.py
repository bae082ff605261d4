"""Fidelity of a re-routed MoE model against the unmodified one, at fixed batch compositions.

    from sere.harness.fidelity import Composition, reference_pass, fidelity
    comp = Composition(batch_size=16, seq_len=128, num_windows=64)
    ref = reference_pass(model, ids, comp)                       # stock model, once
    m = fidelity(model, ref, similarity, select_top_k=2, threshold=0.1, method="sere")
    m.kl, m.top1_agreement, m.ppl_ratio, m.match_length, m.experts_after

Why batch composition matters: SERE's primary set is the union of the top-S experts of every
token that shares a forward pass, so the same token is re-routed differently in different
company. A `Composition` fixes that company. The held-out token stream is cut into
`num_windows` windows of `seq_len` tokens; window w goes to batch w % n_batches (n_batches =
num_windows / batch_size), so the B sequences of a batch come from far-apart places in the
text, as unrelated requests in a server would. Each batch is then decoded in lock-step: the B
tokens at position t are one decode step. The model runs teacher-forced on the whole batch
([B, L] in one forward), and the routing transform is applied per decode step: the router's
ids [B*L, k] are viewed as [L, B, k] and each step's [B, k] is transformed alone. Earlier
positions' keys and values are computed with re-routing too, exactly as in real batched
decoding (where they were produced by earlier re-routed steps), so this equals B sequences
decoded together from their first token, without the cost of a token-by-token loop.

Metrics (over every position that has a next token, all windows):
  ppl_ratio       exp(mean NLL re-routed) / exp(mean NLL stock) on the held-out next tokens;
  top1_agreement  share of positions where both models' most likely next token agree;
  kl              mean KL(stock || re-routed) of the next-token distributions (nats);
  match_length    greedy generation from each window's first `prompt_len` tokens, batched
                  as above (prefill and decode steps both grouped per position): mean count of
                  leading generated tokens equal to the stock model's (max `gen_len`);
  experts_before / experts_after  mean distinct experts per decode step and MoE layer, in the
                  router's own ids and after the transform (the memory traffic SERE saves).
The transform goes in through `sere.hf.enable` (method: a name of `sere.harness.methods.METHODS` or a
callable with SERE's call shape). Index letters: W = windows, B = batch, L = positions,
V = vocabulary, T = tokens of one router call, k = experts per token, E = experts.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

GREEDY_PROMPT_LEN = 16
GREEDY_GEN_LEN = 32


@dataclass(frozen=True)
class Composition:
    """Which held-out windows share each forward pass (see the module docstring)."""

    batch_size: int
    seq_len: int = 128
    num_windows: int = 64

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "num_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (a position and its next token), got {self.seq_len}")
        if self.num_windows % self.batch_size:
            raise ValueError(
                f"num_windows ({self.num_windows}) must be a multiple of batch_size ({self.batch_size}) "
                "so every batch is full"
            )

    @property
    def num_batches(self) -> int:
        return self.num_windows // self.batch_size

    def batches(self, ids: torch.Tensor) -> torch.Tensor:
        """[n_batches, B, L] token ids: window w of the stream goes to batch w % n_batches.
        ids may also be the batches already composed, [n_batches, B, L] (e.g. one minority
        request among B-1 of another domain, sere.harness.compositions): checked and kept."""
        if ids.dim() == 3:
            if tuple(ids.shape) != (self.num_batches, self.batch_size, self.seq_len):
                raise ValueError(f"composed batches of shape {tuple(ids.shape)} do not match {self} "
                                 f"({self.num_batches}, {self.batch_size}, {self.seq_len})")
            return ids
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D token stream or [n, B, L] batches, got shape {tuple(ids.shape)}")
        need = self.num_windows * self.seq_len
        if ids.numel() < need:
            raise ValueError(f"{self.num_windows} windows of {self.seq_len} need {need} tokens, the stream has {ids.numel()}")
        win = ids[:need].view(self.num_windows, self.seq_len)  # W, L
        n = self.num_batches
        return win.view(self.batch_size, n, self.seq_len).transpose(0, 1).contiguous()  # n, B, L


# ---- routing statistics per decode step ------------------------------------------------------


def distinct_per_step(ids: torch.Tensor, batch_size: int, num_experts: int) -> torch.Tensor:
    """[L] distinct valid experts per decode step, for router ids [B*L, k] of a [B, L] batch."""
    T, k = ids.shape
    B, E = batch_size, num_experts
    if T % B:
        raise ValueError(f"router saw {T} tokens, not a multiple of the batch size {B}")
    steps = ids.view(B, T // B, k).transpose(0, 1).reshape(T // B, B * k)  # L, B*k
    idx = torch.where((steps >= 0) & (steps < E), steps, torch.full_like(steps, E)).long()  # L, B*k
    seen = torch.zeros(steps.shape[0], E + 1, dtype=torch.bool, device=ids.device)  # L, E+1
    seen.scatter_(1, idx, True)
    return seen[:, :E].sum(dim=1)  # L


class StepExpertCounter:
    """Forward hooks on every MoE router that add up distinct experts per decode step and
    layer. Hooks run in registration order and each sees the output the previous one returned:
    a counter attached before `sere.hf.enable` counts the router's own ids, one attached after
    counts the re-routed ids."""

    def __init__(self, model, batch_size: int):
        from sere.hf import find_routers

        self.batch_size = batch_size
        self.totals: dict[int, list[float]] = {}  # layer -> [sum of distinct experts, steps]
        self._hooks = [s.module.register_forward_hook(self._hook(s.layer, s.num_experts)) for s in find_routers(model)]

    def _hook(self, layer: int, num_experts: int):
        def hook(module, args, output):
            counts = distinct_per_step(output[2], self.batch_size, num_experts)  # L
            acc = self.totals.setdefault(layer, [0.0, 0])
            acc[0] += float(counts.sum())
            acc[1] += counts.numel()

        return hook

    def per_layer(self) -> dict[int, float]:
        return {layer: s / n for layer, (s, n) in sorted(self.totals.items()) if n}

    def mean(self) -> float:
        """Mean over layers of each layer's mean distinct experts per step."""
        per = self.per_layer()
        return sum(per.values()) / len(per) if per else float("nan")

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class PerStepTransform:
    """Wraps a routing transform (SERE's call shape) so that it sees one decode step at a
    time: router ids [B*L, k] of a [B, L] batch become L calls on [B, k]."""

    def __init__(self, transform: Callable, batch_size: int):
        self.transform = transform
        self.batch_size = batch_size

    def __call__(self, topk_ids, similarity, select_top_k, threshold):
        T, k = topk_ids.shape
        B = self.batch_size
        if T % B:
            raise ValueError(f"router saw {T} tokens, not a multiple of the batch size {B}")
        steps = topk_ids.view(B, T // B, k).transpose(0, 1)  # L, B, k
        out = torch.stack([self.transform(s, similarity, select_top_k, threshold) for s in steps])  # L, B, k
        return out.transpose(0, 1).reshape(T, k)  # T, k


# ---- reference and re-routed passes ---------------------------------------------------------


@dataclass
class Reference:
    """What the stock model does on a composition: kept to compare every setting against."""

    composition: Composition
    batches: torch.Tensor  # n, B, L token ids
    logprobs: torch.Tensor  # n, B, L-1, V next-token log-probabilities (float32)
    nll: float  # mean next-token NLL
    greedy: torch.Tensor  # n, B, gen_len greedy continuation of each window's prompt
    experts: float  # mean distinct experts per decode step and layer
    experts_per_layer: dict[int, float]
    prompt_len: int
    gen_len: int


@dataclass
class Fidelity:
    """Metrics of one setting against its Reference (see the module docstring)."""

    method: str
    select_top_k: int
    threshold: float
    batch_size: int
    ppl_ratio: float
    top1_agreement: float
    kl: float
    match_length: float
    experts_before: float
    experts_after: float
    experts_after_per_layer: dict[int, float] = field(default_factory=dict)
    # Per batch row (the same row of every batch: one request's place in the batch), [B] each.
    kl_by_row: list[float] = field(default_factory=list)
    top1_by_row: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch.to(_device_of(model))).logits.float()  # B, L, V
    return torch.log_softmax(logits[:, :-1], dim=-1).cpu()  # B, L-1, V


@torch.no_grad()
def greedy_continuation(model, prompts: torch.Tensor, gen_len: int) -> torch.Tensor:
    """[B, gen_len] greedy tokens after `prompts` [B, P], with the KV cache; all B prompts
    have the same length, so the batch stays aligned (no padding)."""
    dev = _device_of(model)
    out = model(input_ids=prompts.to(dev), use_cache=True)
    tokens = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # B, 1
    for _ in range(gen_len):
        tokens.append(nxt)
        if len(tokens) == gen_len:
            break
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, out))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # B, 1
    return torch.cat(tokens, dim=1).cpu()  # B, gen_len


def cache_kwargs(model, out) -> dict:
    """The keyword that hands `out`'s KV cache to the model's next forward: `cache` where the
    forward takes it (transformers >= 5.2x, which deprecates `past_key_values` with a
    FutureWarning), else `past_key_values` (earlier 5.x)."""
    past = getattr(out, "cache", None)
    if past is None:
        past = out.past_key_values
    return {"cache" if "cache" in _forward_parameters(type(model)) else "past_key_values": past}


def _forward_parameters(cls) -> frozenset[str]:
    params = _FORWARD_PARAMETERS.get(cls)
    if params is None:
        params = _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return params


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def _nll(logprobs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL of [B, L-1, V] log-probs against the batch's tokens."""
    return -logprobs.gather(-1, batch[:, 1:, None]).sum()


@torch.no_grad()
def reference_pass(
    model, ids: torch.Tensor, composition: Composition, *, prompt_len: int = GREEDY_PROMPT_LEN, gen_len: int = GREEDY_GEN_LEN
) -> Reference:
    """Run the stock model over the composition once (log-probs, greedy text, experts)."""
    if not 1 <= prompt_len <= composition.seq_len:
        raise ValueError(f"prompt_len must be in 1..seq_len={composition.seq_len}, got {prompt_len}")
    batches = composition.batches(ids)  # n, B, L
    counter = StepExpertCounter(model, composition.batch_size)
    try:
        lps = [_logprobs(model, b) for b in batches]
    finally:
        counter.remove()
    logprobs = torch.stack(lps)  # n, B, L-1, V
    nll = float(sum(_nll(lp, b) for lp, b in zip(lps, batches))) / (batches[:, :, 1:].numel())
    greedy = torch.stack([greedy_continuation(model, b[:, :prompt_len], gen_len) for b in batches])  # n, B, G
    return Reference(composition, batches, logprobs, nll, greedy, counter.mean(), counter.per_layer(), prompt_len, gen_len)


def leading_matches(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: how many leading tokens of a and b agree. a, b: [..., G] -> [...]."""
    same = (a == b).long()  # ..., G
    return same.cumprod(dim=-1).sum(dim=-1)


@torch.no_grad()
def fidelity(
    model,
    ref: Reference,
    similarity,
    *,
    select_top_k: int,
    threshold: float,
    method: str | Callable = "sere",
    method_options: Mapping | None = None,
    backend: str = "torch",
    greedy: bool = True,
) -> Fidelity:
    """Metrics of `method` at (S, rho) against the stock reference, on ref's composition.

    similarity: what `sere.hf.enable` takes (artifact path or {layer: [E, E]}); a fresh
    transform is built per call, so seeded methods (random) are reproducible.
    """
    import sere.hf
    from sere.harness.methods import get_method

    comp = ref.composition
    B = comp.batch_size
    name = method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)
    if isinstance(method, str):
        opts = dict(method_options or {})
        if method == "sere":
            opts.setdefault("backend", backend)
        transform = get_method(method, **opts)
    else:
        if method_options:
            raise TypeError("method_options only apply to a method given by name")
        transform = method

    before = StepExpertCounter(model, B)
    handle = sere.hf.enable(
        model, similarity, select_top_k=select_top_k, threshold=threshold,
        method=PerStepTransform(transform, B), record_stats=False,
    )
    after = StepExpertCounter(model, B)
    try:
        nll_sum = 0.0
        agree_rows = torch.zeros(B, dtype=torch.float64)  # B
        kl_rows = torch.zeros(B, dtype=torch.float64)  # B
        for i, batch in enumerate(ref.batches):
            lp = _logprobs(model, batch)  # B, L-1, V
            lp_ref = ref.logprobs[i]  # B, L-1, V
            nll_sum += float(_nll(lp, batch))
            agree_rows += (lp.argmax(-1) == lp_ref.argmax(-1)).sum(-1).double()
            kl_rows += (lp_ref.exp() * (lp_ref - lp)).sum((-1, -2)).double()
        agree, kl_sum = float(agree_rows.sum()), float(kl_rows.sum())
        experts_before, experts_after, per_layer = before.mean(), after.mean(), after.per_layer()
        before.remove()
        after.remove()
        match = float("nan")
        if greedy:
            gens = [greedy_continuation(model, b[:, : ref.prompt_len], ref.gen_len) for b in ref.batches]
            match = float(leading_matches(torch.stack(gens), ref.greedy).float().mean())
    finally:
        before.remove()
        after.remove()
        handle.remove()
    positions = ref.batches[:, :, 1:].numel()
    return Fidelity(
        method=name,
        select_top_k=int(select_top_k),
        threshold=float(threshold),
        batch_size=B,
        ppl_ratio=math.exp(nll_sum / positions - ref.nll),
        top1_agreement=agree / positions,
        kl=kl_sum / positions,
        match_length=match,
        experts_before=experts_before,
        experts_after=experts_after,
        experts_after_per_layer=per_layer,
        kl_by_row=(kl_rows / (positions // B)).tolist(),
        top1_by_row=(agree_rows / (positions // B)).tolist(),
    )


# ---- regression gate ------------------------------------------------------------------------

# metric -> +1 if larger is better, -1 if smaller is better (fewer experts = cheaper)
GATE_METRICS = {"kl": -1, "top1_agreement": +1, "ppl_ratio": -1, "match_length": +1, "experts_after": -1}


@dataclass(frozen=True)
class Tolerance:
    """|current - golden| <= abs + rel * |golden| passes."""

    abs: float = 0.0
    rel: float = 0.0

    def allows(self, current: float, golden: float) -> bool:
        return abs(current - golden) <= self.abs + self.rel * abs(golden)


def gate_failures(
    current: Mapping[str, Mapping[str, float]],
    goldens: Mapping[str, Mapping[str, float]],
    tolerances: Mapping[str, Tolerance],
) -> list[str]:
    """One message per (setting, metric) outside its tolerance; settings are keys like
    "sere:S=2:rho=0.1". Both directions fail: a change for the better also means the goldens
    no longer describe the code (rewrite them on purpose, with --update-goldens)."""
    failures = []
    for setting, gold in goldens.items():
        now = current.get(setting)
        if now is None:
            failures.append(f"{setting}: not measured (the goldens have it)")
            continue
        for metric, tol in tolerances.items():
            if metric not in gold:
                continue
            c, g = float(now[metric]), float(gold[metric])
            if math.isnan(c) or not tol.allows(c, g):
                better = (c - g) * GATE_METRICS.get(metric, 1) > 0
                failures.append(
                    f"{setting}: {metric} = {c:.6g}, golden {g:.6g} ({'better' if better else 'WORSE'} by "
                    f"{abs(c - g):.3g}; allowed {tol.abs:g} + {tol.rel:g} x golden)"
                )
    return failures


def setting_key(method: str, select_top_k: int, threshold: float) -> str:
    return f"{method}:S={int(select_top_k)}:rho={float(threshold):g}"
