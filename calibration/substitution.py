"""Substitution similarity: how well expert i stands in for expert j where the router sends j.

    result = calibrate_substitution(model, token_ids, batch_size=8)   # {layer: E x E}, asymmetric
    sim = substitution_matrix(outputs, topk_ids, topk_weights)         # outputs: E, N, D
    ref = substitution_pairwise(outputs, topk_ids, topk_weights)       # same, one pair at a time

Re-routing hands a token routed to expert j expert i's output instead, at j's weight. So the
error that matters is measured on the tokens routed to j, weighted as the router weights them:

    err[j, i] = sum_{x -> j} a_j(x) |E_j(x) - E_i(x)|^2  /  sum_{x -> j} a_j(x) |E_j(x)|^2
    sim[j, i] = clip(1 - err[j, i], -1, 1),   diagonal 1

with a_j(x) = w_j(x)^2 (the router's weight of j for x, "router" weighting) or 1 ("uniform").
err = 1 is what dropping j costs (E_i = 0), so sim > 0 reads "better than dropping j", and a
threshold rho reads "move j only to a primary that removes at least rho of the dropping error".
Row j = the moved expert, column i = the candidate: how the routing contract reads sim[e, :].
Why clip to [-1, 1] and not [0, 1]: below 0 the ranking still tells a bad stand-in from a
worse one (it matters when every loaded candidate is worse than dropping and rho lets the slot
move anyway), and rho = 0 keeps its meaning "only where it beats dropping"; beyond err = 2
(twice the dropping error) the candidates are all equally useless.

A row whose denominator is 0 (no calibration token routed to j, or j's output is zero on all of
them) has no measured substitution error: its off-diagonal entries are 0 ("no better than
dropping", so rho > 0 keeps j critical) and a warning names the experts.

The sums are kept per layer as [E, E] float64 accumulators (memory does not grow with data);
per chunk one matmul gives every pair. Distances are taken on outputs centred over experts per
token (a shift shared by all experts leaves |E_j - E_i| unchanged) so near-equal experts do not
lose their difference to cancellation.
"""
from __future__ import annotations

import warnings

import torch

from sere.calibration.calibrate import (
    CalibrationError,
    CalibrationResult,
    check_token_batch,
    feed_captured,
    moe_layers_of,
)
from sere.calibration.experts import MoELayer, iter_expert_outputs

WEIGHTINGS = ("router", "uniform")
SIM_RANGE = (-1.0, 1.0)


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown substitution weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def routed_weight_squares(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, weighting: str = "router"
) -> torch.Tensor:
    """[T, E] float64: a_j(x) = w_j(x)^2 (or 1) where j is among x's valid top-k ids, else 0."""
    check_weighting(weighting)
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_weights must be [tokens, k] of one shape, got {tuple(topk_ids.shape)} "
            f"and {tuple(topk_weights.shape)}"
        )
    valid = (topk_ids >= 0) & (topk_ids < num_experts)  # T, k: ids outside 0..E-1 are not experts
    w = topk_weights.double() ** 2 if weighting == "router" else torch.ones_like(topk_weights, dtype=torch.float64)
    w = torch.where(valid, w, torch.zeros_like(w))  # T, k
    idx = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()  # T, k
    out = torch.zeros(topk_ids.shape[0], num_experts, dtype=torch.float64, device=topk_ids.device)  # T, E
    return out.scatter_add_(1, idx, w)


class SubstitutionAccumulator:
    """err numerators [E, E], denominators [E] and routed-token counts [E], summed over chunks."""

    def __init__(self, num_experts: int, weighting: str = "router", device=None):
        check_weighting(weighting)
        self.num_experts = num_experts
        self.weighting = weighting
        self.num = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=device)  # E, E
        self.den = torch.zeros(num_experts, dtype=torch.float64, device=device)  # E
        self.routed = torch.zeros(num_experts, dtype=torch.int64, device=device)  # E
        self.tokens = 0

    def update(self, outputs: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """outputs [E, T, D]: every expert on the same T tokens; topk_ids/weights [T, k]."""
        e = self.num_experts
        if outputs.dim() != 3 or outputs.shape[0] != e or outputs.shape[1] != topk_ids.shape[0]:
            raise ValueError(
                f"outputs must be [{e}, tokens, hidden] with tokens = {topk_ids.shape[0]} (the routed tokens), "
                f"got shape {tuple(outputs.shape)}"
            )
        if self.num.device != outputs.device:
            self.num, self.den, self.routed = (t.to(outputs.device) for t in (self.num, self.den, self.routed))
        a = routed_weight_squares(topk_ids, topk_weights, e, self.weighting).T  # E, T
        y = outputs.double()  # E, T, D
        c = y - y.mean(dim=0, keepdim=True)  # E, T, D: centred over experts, same pair distances
        sq = (c * c).sum(-1)  # E, T
        cross = (c * a[:, :, None]).reshape(e, -1) @ c.reshape(e, -1).T  # E, E: sum_x a_j <c_j, c_i>
        # |c_j - c_i|^2 = |c_j|^2 + |c_i|^2 - 2 <c_j, c_i>, each weighted by a_j(x)
        self.num += (a * sq).sum(1)[:, None] + a @ sq.T - 2 * cross  # E, E
        self.den += (a * (y * y).sum(-1)).sum(1)  # E
        self.routed += (a > 0).sum(1)
        self.tokens += topk_ids.shape[0]

    def result(self, *, layer: int | None = None) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no tokens were accumulated")
        return substitution_from_sums(self.num, self.den, layer=layer).cpu()


def substitution_from_sums(num: torch.Tensor, den: torch.Tensor, *, layer: int | None = None) -> torch.Tensor:
    """sim = clip(1 - num / den[:, None]); rows with den = 0 set to 0 (warned); diagonal 1."""
    if not (bool(torch.isfinite(num).all()) and bool(torch.isfinite(den).all())):
        raise FloatingPointError("substitution sums have non-finite values (non-finite expert outputs?)")
    empty = den <= 0  # E
    err = num.clamp_min(0) / torch.where(empty, torch.ones_like(den), den)[:, None]  # E, E
    sim = (1 - err).clamp(*SIM_RANGE)
    sim[empty] = 0.0
    if bool(empty.any()):
        where = f"layer {layer}: " if layer is not None else ""
        warnings.warn(
            f"{where}no measured substitution error for expert(s) {empty.nonzero().flatten().tolist()} (no calibration "
            "token routed to them, or zero output there); their rows are set to 0 (no better than dropping)",
            RuntimeWarning,
            stacklevel=2,
        )
    return sim.float().fill_diagonal_(1.0)  # E, E


def substitution_matrix(
    outputs: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weighting: str = "router"
) -> torch.Tensor:
    """All pairs of one layer at once: outputs [E, N, D], routing [N, k] -> [E, E] float32."""
    acc = SubstitutionAccumulator(outputs.shape[0], weighting, outputs.device)
    acc.update(outputs, topk_ids, topk_weights)
    return acc.result()


def substitution_pairwise(
    outputs: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weighting: str = "router"
) -> torch.Tensor:
    """Reference: the definition, one (j, i) pair and one token at a time. Slow; for tests."""
    check_weighting(weighting)
    e, n, _ = outputs.shape
    y = outputs.double()
    num = torch.zeros(e, e, dtype=torch.float64)
    den = torch.zeros(e, dtype=torch.float64)
    for x in range(n):
        for slot in range(topk_ids.shape[1]):
            j = int(topk_ids[x, slot])
            if not 0 <= j < e:
                continue
            a = float(topk_weights[x, slot]) ** 2 if weighting == "router" else 1.0
            den[j] += a * float((y[j, x] ** 2).sum())
            for i in range(e):
                num[j, i] += a * float(((y[j, x] - y[i, x]) ** 2).sum())
    return substitution_from_sums(num, den)


# ---------------------------------------------------------------------------- the model pass


@torch.no_grad()
def calibrate_substitution(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    weighting: str = "router",
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Substitution similarity of every expert pair in every MoE layer on `token_ids` [S, L].

    A forward pre-hook on each layer's fused `experts` module captures what the block hands
    it: the hidden states [T, H] and the router's top-k ids and weights [T, k]. Every expert is
    then run on those tokens (sere.calibration.experts) and the sums accumulate per layer.
    `max_tokens` caps the tokens used (default: all).
    """
    check_weighting(weighting)
    check_token_batch(token_ids, batch_size)
    if max_tokens is not None and max_tokens < 1:
        raise CalibrationError(f"max_tokens must be >= 1, got {max_tokens}")
    layers = moe_layers_of(model)
    accs = {layer.index: SubstitutionAccumulator(layer.num_experts, weighting) for layer in layers}
    budget = token_ids.numel() if max_tokens is None else min(max_tokens, token_ids.numel())

    def consume(take: int, captured: dict) -> None:
        for layer in layers:
            x, ids, w = (t[:take] for t in captured[layer.index])  # T, H; T, k; T, k
            _accumulate(accs[layer.index], layer, x, ids, w)

    seen = feed_captured(model, layers, token_ids, batch_size=batch_size, budget=budget, make_hook=_capture_routing,
                         consume=consume, desc="calibrating (substitution)", progress=progress)
    matrices = {index: acc.result(layer=index) for index, acc in accs.items()}
    return CalibrationResult(matrices, seen, layers[0].num_experts)


def _accumulate(acc: SubstitutionAccumulator, layer: MoELayer, x, ids, w) -> None:
    start = 0
    for outputs in iter_expert_outputs(layer, x):  # E, c, H: consecutive token chunks of x
        c = outputs.shape[1]
        acc.update(outputs, ids[start : start + c], w[start : start + c])
        start += c


def _capture_routing(store: dict, index: int):
    """The block calls experts(hidden [.., H], top_k_index [T, k], top_k_weights [T, k])."""

    def hook(module, args, kwargs):
        given = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        if len(given) < 3:
            raise CalibrationError(
                f"MoE layer {index}: the experts module was called without top-k ids and weights; "
                "substitution similarity needs the routing"
            )
        x, ids, w = given[:3]
        store[index] = (x.detach().reshape(-1, x.shape[-1]), ids.detach().reshape(-1, ids.shape[-1]),
                        w.detach().reshape(-1, w.shape[-1]))

    return hook
