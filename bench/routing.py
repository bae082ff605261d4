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

Trace file format (safetensors, no pickle), written by `save_trace`, read by `load_trace`:
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

import re
from dataclasses import dataclass
from pathlib import Path

import torch

TRACE_FORMAT = "sere-routing-trace"
TRACE_VERSION = "1"


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


def _gumbel_topk(log_p: torch.Tensor, T: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token, drawn one after another without replacement with
    probabilities exp(log_p) (the Gumbel top-k trick), in the order they were drawn."""
    E = log_p.shape[0]
    u = torch.rand(T, E, generator=gen).clamp_(min=1e-12)  # T, E
    keys = log_p.unsqueeze(0) - torch.log(-torch.log(u))  # T, E
    top_keys, ids = torch.topk(keys, k, dim=-1, sorted=True)  # T, k
    weights = torch.softmax(top_keys, dim=-1)  # T, k: descending, like a router's top-k
    return ids, weights


def zipf_routing(T: int, E: int, k: int, alpha: float, *, seed: int = 0) -> Routing:
    """Routing where expert popularity follows Zipf's law: the expert of rank r (a seeded
    random ranking) is drawn with probability proportional to r ** -alpha."""
    _check_sizes(T, E, k)
    if not alpha >= 0:
        raise ValueError(f"Zipf exponent must be >= 0, got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    rank_of = torch.empty(E)
    rank_of[torch.randperm(E, generator=gen)] = torch.arange(1, E + 1, dtype=torch.float32)  # E
    log_p = -alpha * torch.log(rank_of)  # E, unnormalised: top-k does not care
    ids, weights = _gumbel_topk(log_p, T, k, gen)
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


@dataclass(frozen=True)
class RoutingTrace:
    """Recorded router choices of one model, per MoE layer."""

    ids: dict[int, torch.Tensor]  # layer -> N, k int32
    weights: dict[int, torch.Tensor]  # layer -> N, k float32 (may be empty)
    similarity: dict[int, torch.Tensor]  # layer -> E, E float32 (may be empty)
    num_experts: int
    top_k: int
    model: str
    source: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.ids)


def save_trace(
    path,
    ids: dict[int, torch.Tensor],
    *,
    num_experts: int,
    model: str,
    source: str,
    weights: dict[int, torch.Tensor] | None = None,
    similarity: dict[int, torch.Tensor] | None = None,
) -> Path:
    """Write a routing trace (see the module docstring for the format); returns the path."""
    from safetensors.torch import save_file

    if not ids:
        raise ValueError("a trace needs at least one layer of ids")
    ks = {int(t.shape[1]) for t in ids.values() if t.dim() == 2}
    if any(t.dim() != 2 for t in ids.values()) or len(ks) != 1:
        raise ValueError(f"every layer's ids must be [N, k] with one k for all layers, got shapes "
                         f"{ {layer: tuple(t.shape) for layer, t in ids.items()} }")
    tensors = {f"layer.{layer}.topk_ids": t.to(torch.int32).contiguous().cpu() for layer, t in ids.items()}
    for layer, w in (weights or {}).items():
        tensors[f"layer.{layer}.topk_weights"] = w.float().contiguous().cpu()
    for layer, s in (similarity or {}).items():
        tensors[f"layer.{layer}.similarity"] = s.float().contiguous().cpu()
    meta = dict(format=TRACE_FORMAT, version=TRACE_VERSION, num_experts=str(int(num_experts)),
                top_k=str(ks.pop()), model=model, source=source)
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


_KEY = re.compile(r"^layer\.(\d+)\.(topk_ids|topk_weights|similarity)$")


def load_trace(path) -> RoutingTrace:
    """Read and validate a routing trace written by `save_trace`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"routing trace {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # not a safetensors file (a pickle, a truncated write, ...)
        raise ValueError(f"{path} is not a safetensors routing trace: {exc}") from exc
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, expected {TRACE_FORMAT!r}")
    if meta.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: trace version {meta.get('version')!r} is not supported (expected {TRACE_VERSION})")
    E, k = int(meta["num_experts"]), int(meta["top_k"])
    parts: dict[str, dict[int, torch.Tensor]] = {"topk_ids": {}, "topk_weights": {}, "similarity": {}}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        parts[m.group(2)][int(m.group(1))] = t
    for layer, t in parts["topk_ids"].items():
        if t.dim() != 2 or t.shape[1] != k or t.shape[0] == 0 or t.dtype.is_floating_point:
            raise ValueError(f"{path}: layer {layer} ids must be a non-empty integer [N, {k}], "
                             f"got {t.dtype} {tuple(t.shape)}")
    for layer, s in parts["similarity"].items():
        if tuple(s.shape) != (E, E):
            raise ValueError(f"{path}: layer {layer} similarity must be [{E}, {E}], got {tuple(s.shape)}")
    if not parts["topk_ids"]:
        raise ValueError(f"{path}: the trace holds no layer ids")
    return RoutingTrace(parts["topk_ids"], parts["topk_weights"], parts["similarity"], E, k,
                        meta.get("model", "?"), meta.get("source", "?"))


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
