"""The router's top-k and SERE in one kernel, inside vLLM (`additional_config={"sere": {..., "fuse_topk": true}}`).

Without it a layer runs vLLM's top-k kernel, then SERE's re-route kernel: one launch more than
stock, about 2 us per MoE layer under CUDA graphs. With it the re-routed layer's router computes
its top-k with sere.kernels.numba_topk (softmax, top-k, weights, re-routing: one launch) instead
of vLLM's, and the wrapper does not re-route again. Calls the re-router would leave alone (more
tokens than max_tokens, identity settings) run vLLM's own top-k. Only calls of FUSED_MAX_TOKENS
tokens or fewer are fused, larger ones take vLLM's top-k and the re-route kernel. On the H100 the
fused kernel, with a token per block from T = 2, is ahead of the two kernels to T = 16 (bench/RESULTS.md
section 27: 5.2 / 6.2 / 6.2 against 6.1 / 6.5 / 6.5 us at T = 1 / 8 / 16) and behind from T = 64;
the limit stays at one token until the fused calls up to 16 tokens have run inside vLLM (branch
cand-fused-limit16). Where the layer merges duplicate slots (merge_slots, sere.vllm.router.merge_tokens)
the fused calls within its merge limit merge in the same launch.

Eligible (`why_not` says what is missing, and the plugin logs it when fuse_topk was asked for):
vLLM's plain `FusedTopKRouter` with softmax scoring (its grouped, biased, sigmoid and custom
routers keep the two-kernel path), the numba backend, the `sere` transform, no statistics
observer (it needs the ids before re-routing), no padding mask (VLLM_MOE_SKIP_PADDING), E <= 1024
and k <= 16. The weights are the kernel's float32 softmax, equal to vLLM's up to rounding.
"""
from __future__ import annotations

import os

import torch

from sere.rerouter import LayerRerouter

ROUTER_CLASS = "FusedTopKRouter"
FUSED_MAX_TOKENS = 1  # the calls fused: decode at batch 1, the size checked inside vLLM so far


def why_not(router, rerouter: LayerRerouter, resolved_backend: str, method: str) -> str | None:
    """None if this layer can take the fused kernel, else the reason, in a few words."""
    if type(router).__name__ != ROUTER_CLASS or not hasattr(type(router), "_compute_routing"):
        return f"router {type(router).__name__} is not vLLM's plain {ROUTER_CLASS}"
    if getattr(router, "scoring_func", None) != "softmax":
        return f"scoring {getattr(router, 'scoring_func', None)!r} is not softmax"
    if not isinstance(getattr(router, "renormalize", None), bool):
        return "the router has no renormalize flag"
    if getattr(router, "eplb_state", None) is not None:
        return "EPLB is on"
    if resolved_backend != "numba":
        return f"backend {resolved_backend!r} is not numba"
    if method != "sere":
        return f"method {method!r} is not sere"
    if rerouter.observers:
        return "statistics are recorded (they need the ids before re-routing)"
    if getattr(rerouter, "primary_group", None) is not None:
        return "primary_set global (the fused kernel builds P from this rank's tokens; the union needs an all-reduce)"
    if os.environ.get("VLLM_MOE_SKIP_PADDING", "0") not in ("", "0"):
        return "VLLM_MOE_SKIP_PADDING is set (the fused kernel has no padding mask)"
    from sere.kernels.numba_kernels import MAX_EXPERTS  # numba is there: the backend is numba
    from sere.kernels.numba_topk import MAX_K

    if rerouter.num_experts > MAX_EXPERTS or getattr(router, "top_k", MAX_K + 1) > MAX_K:
        return f"E={rerouter.num_experts} or k={getattr(router, 'top_k', None)} is beyond the kernel's {MAX_EXPERTS} / {MAX_K}"
    return None


class FusedTopK:
    """One layer's fused top-k: `takes(tokens)` says whether a call of that many tokens goes through
    it (a shape decision: graph-safe), `__call__` returns (topk_weights, topk_ids).
    `kernel` is topk_reroute_numba (a stand-in can be given for tests); calls of at most
    `max_fused_tokens` tokens are fused (FUSED_MAX_TOKENS). The kernel's merging variant holds one
    block of tokens (sere.kernels.numba_topk_op.MERGE_MAX_TOKENS) and refuses more, so fused calls
    past it do not merge; a stand-in kernel has no such bound."""

    def __init__(self, rerouter: LayerRerouter, top_k: int, renormalize: bool, kernel=None,
                 max_fused_tokens: int = FUSED_MAX_TOKENS):
        merge_block = max_fused_tokens
        if kernel is None:
            from sere.kernels.numba_cuda import topk_reroute_numba as kernel
            from sere.kernels.numba_topk_op import MERGE_MAX_TOKENS as merge_block
        if max_fused_tokens < 1:
            raise ValueError(f"max_fused_tokens must be at least 1, got {max_fused_tokens}")
        self.rerouter = rerouter
        self.top_k = top_k
        self.renormalize = renormalize
        self.kernel = kernel
        self.max_fused_tokens = max_fused_tokens
        self.max_merged_tokens = min(max_fused_tokens, merge_block)  # the fused calls that may merge

    def takes(self, tokens: int) -> bool:
        """Whether a call of `tokens` tokens is fused: small enough, and the re-router would act."""
        r = self.rerouter
        if r.select_top_k <= 0 or r.select_top_k >= self.top_k or tokens > self.max_fused_tokens:
            return False
        return r.max_tokens is None or tokens <= r.max_tokens

    def merges(self, tokens: int) -> bool:
        """Whether a fused call also merges duplicate slots (the layer merges, merge_slots, and the
        call is within its merge limit and the kernel's one block); a shape decision, graph-safe."""
        limit = self.rerouter.merge_tokens  # None where merging is off (or resolve_merge_support dropped it)
        return limit is not None and tokens <= min(limit, self.max_merged_tokens)

    def __call__(self, router_logits: torch.Tensor, indices_type: torch.dtype | None):
        r = self.rerouter
        return self.kernel(router_logits, r.sim, self.top_k, self.renormalize, r.select_top_k, r.threshold,
                           ids_dtype=indices_type or torch.int32, merge=self.merges(router_logits.shape[0]))
