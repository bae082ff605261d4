"""Run a transformers MoE model over token sequences and compare its experts, layer by layer.

    result = calibrate(model, token_ids, method="cka", kernel="linear", batch_size=8, max_tokens=8192)
    result.matrices        # {decoder layer index: E x E float32}
    result.tokens          # tokens every layer was calibrated on

Forward pre-hooks on each MoE layer's `experts` module capture that layer's inputs (the hidden
states the router dispatches). cosine / frobenius run every expert on them batch by batch and
keep only an [E, E] sum per layer; CKA keeps the first `max_tokens` inputs per layer and runs
the experts once at the end, one layer at a time (so at most one layer's E x N x H outputs
are alive).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from sere.calibration.cka import cka_matrix
from sere.calibration.experts import MoELayer, all_expert_outputs, find_moe_layers, iter_expert_outputs
from sere.calibration.metrics import check_method
from sere.calibration.pointwise import CosineAccumulator, FrobeniusAccumulator

DEFAULT_CKA_MAX_TOKENS = 8192


class CalibrationError(ValueError):
    """The model or the settings cannot produce a similarity artifact."""


@dataclass
class CalibrationResult:
    matrices: dict[int, torch.Tensor]  # layer -> E, E float32 on the CPU
    tokens: int
    num_experts: int


class _LayerState:
    """What one MoE layer keeps between batches."""

    def __init__(self, layer: MoELayer, method: str):
        self.layer = layer
        self.method = method
        self.inputs: list[torch.Tensor] = []  # CKA only: T_b, H per batch
        self.acc = None
        if method == "cosine":
            self.acc = CosineAccumulator(layer.num_experts)
        elif method == "frobenius":
            self.acc = FrobeniusAccumulator(layer.num_experts)

    def add(self, x: torch.Tensor) -> None:  # x: T, H
        if self.acc is None:
            self.inputs.append(x.clone())  # a copy: the model's buffer must not be kept alive or reused
        else:
            for outputs in iter_expert_outputs(self.layer, x):  # E, c, H
                self.acc.update(outputs)

    def result(self, kernel: str, rbf_features: int | None) -> torch.Tensor:
        if self.acc is not None:
            return self.acc.result().cpu()
        x = torch.cat(self.inputs)  # N, H
        self.inputs.clear()
        outputs = all_expert_outputs(self.layer, x)  # E, N, H
        del x
        return cka_matrix(outputs, kernel, rbf_features=rbf_features).cpu()


@torch.no_grad()
def check_token_batch(token_ids: torch.Tensor, batch_size: int) -> None:
    """The calibration inputs every method needs: token ids [sequences, length], batch >= 1."""
    if token_ids.dim() != 2 or token_ids.numel() == 0:
        raise CalibrationError(f"token_ids must be a non-empty [sequences, length] tensor, got {tuple(token_ids.shape)}")
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")


def moe_layers_of(model) -> list[MoELayer]:
    """The model's MoE layers, or a CalibrationError when it has none."""
    layers = find_moe_layers(model)
    if not layers:
        raise CalibrationError(
            f"{type(model).__name__} has no MoE layer (no block with a router `gate` and fused `experts`)"
        )
    return layers


def feed_captured(model, layers: list[MoELayer], token_ids: torch.Tensor, *, batch_size: int, budget: int,
                  make_hook: Callable[[dict, int], Callable], consume: Callable[[int, dict], None],
                  desc: str, progress: bool) -> int:
    """The calibration pass every method shares: run the model's backbone (no LM head) over
    token_ids, batch_size sequences at a time, until `budget` tokens, with a forward pre-hook
    make_hook(store, layer index) on each MoE layer's experts module filling store[index];
    after each batch consume(take, store) gets it, of which the first `take` tokens count.
    Returns the tokens used. The hooks are removed however the pass ends."""
    captured: dict = {}
    hooks = [layer.experts.register_forward_pre_hook(make_hook(captured, layer.index), with_kwargs=True) for layer in layers]
    device = next(model.parameters()).device
    backbone = getattr(model, "base_model", model)  # skips the LM head: logits are not needed
    seen = 0
    try:
        with tqdm(total=budget, unit="tok", desc=desc, disable=not progress) as bar:
            for start in range(0, token_ids.shape[0], batch_size):
                if seen >= budget:
                    break
                batch = token_ids[start : start + batch_size].to(device)  # B, L
                captured.clear()
                backbone(input_ids=batch, use_cache=False)
                take = min(batch.numel(), budget - seen)
                for layer in layers:
                    if layer.index not in captured:
                        raise CalibrationError(f"MoE layer {layer.index} did not run during the forward pass")
                consume(take, captured)
                seen += take
                bar.update(take)
    finally:
        for hook in hooks:
            hook.remove()
        captured.clear()
    return seen


def calibrate(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    method: str = "cka",
    kernel: str = "linear",
    batch_size: int = 8,
    max_tokens: int | None = None,
    rbf_features: int | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Similarity of every expert pair in every MoE layer of `model` on `token_ids` [S, L].

    `max_tokens` caps the tokens used (default: DEFAULT_CKA_MAX_TOKENS for CKA, all for the
    others). The model stays on its device; inputs are moved there.
    """
    check_method(method, kernel)
    check_token_batch(token_ids, batch_size)
    if max_tokens is None and method == "cka":
        max_tokens = DEFAULT_CKA_MAX_TOKENS
    if max_tokens is not None and max_tokens < 2:
        raise CalibrationError(f"max_tokens must be >= 2, got {max_tokens}")
    layers = moe_layers_of(model)
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise CalibrationError(f"MoE layers disagree on the expert count: {sorted(counts)}")

    states = {layer.index: _LayerState(layer, method) for layer in layers}
    budget = token_ids.numel() if max_tokens is None else min(max_tokens, token_ids.numel())

    def consume(take: int, captured: dict[int, torch.Tensor]) -> None:
        for index, state in states.items():
            state.add(captured[index][:take])

    seen = feed_captured(model, layers, token_ids, batch_size=batch_size, budget=budget, make_hook=_capture_into,
                         consume=consume, desc=f"calibrating ({method})", progress=progress)

    matrices = {}
    for index, state in tqdm(states.items(), desc="expert similarity", unit="layer", disable=not progress):
        matrices[index] = state.result(kernel, rbf_features)
    return CalibrationResult(matrices, seen, layers[0].num_experts)


def _capture_into(store: dict[int, torch.Tensor], index: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        store[index] = x.detach().reshape(-1, x.shape[-1])  # T, H (all tokens of the batch, no padding)

    return hook
