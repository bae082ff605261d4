"""A smaller grid for vLLM's Triton expert kernels where SERE bounds the batch's experts
(`additional_config={"sere": {..., "tight_grid": true}}`; off by default until timed on a GPU).

vLLM aligns each expert's tokens to BLOCK_SIZE_M rows and launches its fused-MoE GEMMs over every
M block the aligned list could ever need: topk_ids.numel() + E * (BLOCK_SIZE_M - 1) rows, however
few experts the batch reads. Blocks past the real count exit at once, but each is still scheduled
(and large tiles probably let only one block per SM run at a time). A stock batch cannot promise
fewer experts; a SERE batch can: with method "sere", a local P and a threshold no higher than any
similarity of the layer, every secondary slot lands in P, so at most min(E, T * S) distinct
experts, and the list needs at most numel + (min(E, T * S) + 1) * (BLOCK_SIZE_M - 1) rows (the one
more for invalid ids, which SERE passes through).

The re-router notes that bound on the ids it returns (`note_bound`); the wrapper installed around
vLLM's `_prepare_expert_assignment` hands the GEMMs views of the aligned buffers cut to it (the
same memory: the align op still fills them in full). A view only shortens the grid: blocks before
the real count are unchanged and read nothing past it, so a wrong bound could drop tokens but
never read or write out of bounds. Ids that were copied or cast between the router and the experts
do not match the note and keep the full grid.
Python runs this at eager calls and CUDA-graph captures; replays keep the captured grid.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

# The modules that call _prepare_expert_assignment by a name of their own (vLLM 0.26 and 0.32).
PATCHED_MODULES = (
    "vllm.model_executor.layers.fused_moe.fused_moe",
    "vllm.model_executor.layers.fused_moe.experts.triton_moe",
)
FUNCTION = "_prepare_expert_assignment"


@dataclass
class _Note:
    ids: weakref.ref
    data_ptr: int
    shape: tuple[int, ...]
    max_experts: int


_note: _Note | None = None
trimmed_calls = 0  # eager calls and captures whose grid was cut (a test and a log can read it)


def max_experts_after_sere(num_tokens: int, num_experts: int, select_top_k: int) -> int:
    """The distinct experts a batch can read after SERE when every secondary slot moves into P."""
    return max(0, min(num_experts, num_tokens * select_top_k))


def bound_floor(sim: torch.Tensor, threshold: float) -> float | None:
    """The layer's smallest similarity where the threshold is no higher than it, else None. Only
    then does every secondary slot move into P (whichever P the batch has, the best candidate
    clears the threshold); a re-router keeps the floor to check its threshold against at each call."""
    if sim.numel() == 0:
        return None
    floor = float(sim.min())
    return floor if threshold <= floor else None


def note_bound(ids: torch.Tensor, max_experts: int) -> None:
    """The re-router's promise for `ids` (its output): at most max_experts distinct experts."""
    global _note
    _note = _Note(weakref.ref(ids), ids.data_ptr(), tuple(ids.shape), int(max_experts))


def take_bound(ids: torch.Tensor) -> int | None:
    """The noted bound when `ids` is the noted tensor (alive, same memory and shape), once."""
    global _note
    note, _note = _note, None
    if note is None or note.ids() is None:
        return None
    if note.data_ptr != ids.data_ptr() or note.shape != tuple(ids.shape):
        return None
    return note.max_experts


def cut_rows(num_slots: int, block_m: int, max_experts: int) -> int:
    """The aligned rows at most max_experts experts can fill, in whole blocks, with one bucket more
    for invalid ids (which SERE passes through)."""
    return -(-(num_slots + (max_experts + 1) * (block_m - 1)) // block_m) * block_m


def trim_assignment(assignment: tuple, num_slots: int, block_m: int, max_experts: int) -> tuple:
    """(sorted_ids, expert_ids, num_tokens_post_padded) with the first two cut to what at most
    max_experts experts can fill (cut_rows). vLLM's small-batch path (sorted_ids None) and lists
    already that short come back unchanged."""
    sorted_ids, expert_ids, post_padded = assignment
    if sorted_ids is None or block_m <= 0:
        return assignment
    rows = cut_rows(num_slots, block_m, max_experts)
    if rows >= sorted_ids.shape[0]:
        return assignment
    return sorted_ids[:rows], expert_ids[:rows // block_m], post_padded


def bounded(original):
    """`original` (vLLM's _prepare_expert_assignment) cutting the lists of noted ids."""

    def prepare_expert_assignment(topk_ids, config, *args, **kwargs):
        global trimmed_calls
        assignment = original(topk_ids, config, *args, **kwargs)
        max_experts = take_bound(topk_ids)
        if max_experts is None:
            return assignment
        trimmed = trim_assignment(assignment, topk_ids.numel(), int(config["BLOCK_SIZE_M"]), max_experts)
        if trimmed is not assignment:
            trimmed_calls += 1
        return trimmed

    prepare_expert_assignment.__wrapped__ = original
    prepare_expert_assignment._sere_bounded = True
    return prepare_expert_assignment


def install() -> list[str]:
    """Wrap _prepare_expert_assignment where vLLM's Triton expert paths call it; returns the
    modules wrapped (again: the ones already wrapped). Raises when vLLM has none of them."""
    import importlib

    wrapped = []
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(module, FUNCTION, None)
        if fn is None:
            continue
        if not getattr(fn, "_sere_bounded", False):
            setattr(module, FUNCTION, bounded(fn))
        wrapped.append(name)
    if not wrapped:
        raise RuntimeError(
            f"SERE tight_grid: this vLLM has no {FUNCTION} in {', '.join(PATCHED_MODULES)}; "
            "run without tight_grid"
        )
    return wrapped
