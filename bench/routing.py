"""Routing for the benchmarks: synthetic generators and replay of recorded traces.

Every bench case names the routing it ran with (`Routing.label`, written to
`extra_info["routing"]`), because the activated-expert count, and so the speed-up of SERE,
depends on it far more than on any kernel detail.

    from bench.routing import make_routing
    r = make_routing("zipf:1.2", T=16, E=128, k=8, seed=0)   # r.ids [16, 8], r.weights, r.label

Specs understood by `make_routing`:
  "uniform"          every token picks k distinct experts uniformly at random (what a
                     random-weight router gives; the pessimistic case for SERE).
  "zipf:A"           expert popularity follows Zipf's law with exponent A over a seeded
                     random ranking of the experts (A = 0 is uniform; trained models show
                     skewed loads, A around 1).
  "trace:PATH[@L]"   rows drawn at random from layer L (default: the first) of a routing
                     trace file recorded from a real model (format below).

Trace file format (safetensors, no pickle), written by `save_trace`, read by `load_trace`
(sere/harness/traces.py, re-exported here; the vLLM routing strategies read the same files):
  tensors   "layer.<i>.topk_ids"      int32 [N, k]  router choices of N tokens at MoE layer i,
                                                    slot 0 = largest weight
            "layer.<i>.topk_weights"  float32 [N, k] optional, the matching routing weights
            "layer.<i>.similarity"    float32 [E, E] optional, the layer's calibrated similarity
  metadata  format = "sere-routing-trace", version = "1", num_experts, top_k, model, source
Replay draws T rows without replacement: a decode batch holds one token from each of T
different sequences, which a random draw from a pool of recorded tokens approximates.
Committed traces of the three trained zoo models (decode steps over held-out text, with their
calibrated similarity): bench/traces/<model>.safetensors, made by `python -m bench.record_traces`.

Index letters: T = tokens, k = experts per token, E = experts, N = recorded tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sere.harness.traces import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, load_trace, save_trace  # noqa: F401 (re-exported)
from sere.harness.vllm_routing import gumbel_topk, zipf_log_probs


@dataclass(frozen=True)
class Routing:
    """One batch of router output: ids [T, k] int64 (slot 0 = largest weight), weights [T, k]
    float32 (descending per row; summing to 1 from the generators, as recorded from a trace,
    where a model without top-k renormalisation gives sums below 1), and a label naming where
    it came from."""

    ids: torch.Tensor
    weights: torch.Tensor
    label: str


def _check_sizes(T: int, E: int, k: int) -> None:
    if T < 1:
        raise ValueError(f"need at least one token, got T={T}")
    if not 1 <= k <= E:
        raise ValueError(f"need 1 <= k <= E, got k={k}, E={E}")


def zipf_routing(T: int, E: int, k: int, alpha: float, *, seed: int = 0) -> Routing:
    """Routing where expert popularity follows Zipf's law: the expert of rank r (a seeded
    random ranking) is drawn with probability proportional to r ** -alpha; k distinct experts
    per token (Gumbel top-k), weights descending like a router's top-k. The law is the vLLM
    strategy's (sere.harness.vllm_routing), from one generator seeded with `seed`."""
    _check_sizes(T, E, k)
    if not alpha >= 0:
        raise ValueError(f"Zipf exponent must be >= 0, got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    log_p = zipf_log_probs(E, alpha, 0, generator=gen)  # E, unnormalised: top-k does not care
    weights, ids = gumbel_topk(log_p, T, k, gen)
    label = "uniform" if alpha == 0 else f"zipf:{alpha:g}"
    return Routing(ids, weights, label)


def uniform_routing(T: int, E: int, k: int, *, seed: int = 0) -> Routing:
    """Every token picks k distinct experts uniformly at random."""
    return zipf_routing(T, E, k, 0.0, seed=seed)


def synthetic_similarity(E: int, *, seed: int = 0) -> torch.Tensor:
    """[E, E] float32 symmetric similarity, off-diagonal uniform in [0, 1), unit diagonal: a
    stand-in where no calibrated similarity exists (random-weight models have none that means
    anything). Under it a threshold rho keeps an expert critical with chance (rho ** |P|)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(E, E, generator=gen)  # E, E
    sim = (a + a.T) / 2
    sim.fill_diagonal_(1.0)
    return sim


# --- traces ---------------------------------------------------------------------------


def trace_routing(trace: RoutingTrace, T: int, *, layer: int | None = None, seed: int = 0,
                  label: str = "trace") -> Routing:
    """A batch of T tokens drawn without replacement from one layer of a recorded trace."""
    layer = trace.layers[0] if layer is None else layer
    if layer not in trace.ids:
        raise ValueError(f"trace of {trace.model} has no layer {layer}; it has {trace.layers}")
    pool = trace.ids[layer]  # N, k
    if T > pool.shape[0]:
        raise ValueError(f"trace layer {layer} holds {pool.shape[0]} tokens, fewer than the batch of {T}")
    rows = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:T]  # T
    ids = pool[rows].long()  # T, k
    if layer in trace.weights:
        weights = trace.weights[layer][rows].float()  # T, k
    else:  # rank-ordered stand-in weights; SERE never reads them, the experts do
        weights = torch.softmax(-torch.arange(trace.top_k, dtype=torch.float32), 0).expand(T, -1).clone()
    return Routing(ids, weights, f"{label}@{layer}")


def record_trace(model, batches, *, source: str) -> dict:
    """Run a transformers MoE model over `batches` and collect every router's top-k ids and
    weights per MoE layer, rows in call order; returns kwargs for `save_trace`
    (`save_trace(path, **record_trace(model, batches, source=...))`). A batch is an input_ids
    tensor, or a dict of forward kwargs (e.g. one decode step with `past_key_values`)."""
    from sere.hf import find_routers
    from sere.harness.model_configs import num_experts_of

    ids: dict[int, list[torch.Tensor]] = {}
    weights: dict[int, list[torch.Tensor]] = {}

    def hook_for(layer: int):
        def hook(module, args, output):
            _, w, i = output  # transformers *TopKRouter: (logits, weights [T, k], ids [T, k])
            w = w.detach().reshape(-1, w.shape[-1]).float().cpu()  # T, k
            i = i.detach().reshape(-1, i.shape[-1]).cpu()  # T, k
            # DeepSeek's greedy top-k leaves the slots unsorted; the format wants slot 0 = largest.
            w, order = torch.sort(w, dim=-1, descending=True, stable=True)  # T, k
            ids.setdefault(layer, []).append(torch.gather(i, 1, order))
            weights.setdefault(layer, []).append(w)
        return hook

    sites = find_routers(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no transformers MoE router to record")
    handles = [site.module.register_forward_hook(hook_for(site.layer)) for site in sites]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return dict(ids={layer: torch.cat(v) for layer, v in ids.items()},
                weights={layer: torch.cat(v) for layer, v in weights.items()},
                num_experts=num_experts_of(model.config),
                model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
                source=source)


# --- spec strings -----------------------------------------------------------------------

_trace_cache: dict[str, RoutingTrace] = {}


def _cached_trace(path: str) -> RoutingTrace:
    if path not in _trace_cache:
        _trace_cache[path] = load_trace(path)
    return _trace_cache[path]


def similarity_for(spec: str, E: int, *, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(similarity [E, E], label) to pair with a routing spec: a trace's own calibrated
    similarity where it holds one for the replayed layer, else `synthetic_similarity`."""
    if spec.startswith("trace:"):
        path, _, layer = spec[len("trace:"):].partition("@")
        trace = _cached_trace(path)
        layer_i = int(layer) if layer else trace.layers[0]
        if layer_i in trace.similarity and trace.num_experts == E:
            return trace.similarity[layer_i].float(), f"trace:{Path(path).name}@{layer_i}"
    return synthetic_similarity(E, seed=seed), f"synthetic-uniform(seed={seed})"


def make_routing(spec: str, T: int, E: int, k: int, *, seed: int = 0) -> Routing:
    """Routing for one batch from a spec string (see the module docstring)."""
    if spec == "uniform":
        return uniform_routing(T, E, k, seed=seed)
    if spec.startswith("zipf:"):
        try:
            alpha = float(spec[len("zipf:"):])
        except ValueError:
            raise ValueError(f"bad Zipf spec {spec!r}; write e.g. 'zipf:1.2'") from None
        return zipf_routing(T, E, k, alpha, seed=seed)
    if spec.startswith("trace:"):
        path, _, layer = spec[len("trace:"):].partition("@")
        trace = _cached_trace(path)
        if (trace.num_experts, trace.top_k) != (E, k):
            raise ValueError(f"trace {path} was recorded with E={trace.num_experts}, k={trace.top_k}; "
                             f"this case needs E={E}, k={k}")
        return trace_routing(trace, T, layer=int(layer) if layer else None, seed=seed,
                             label=f"trace:{Path(path).name}")
    raise ValueError(f"unknown routing spec {spec!r}; use 'uniform', 'zipf:A' or 'trace:PATH[@LAYER]'")
