"""Benchmark of one MoE layer: router + SERE + experts, on the transformers experts path.

    pytest bench/test_bench_layer.py                      # CPU: small shapes, quick timing
    pytest bench/test_bench_layer.py --benchmark-disable  # smoke: validate every case once
    pytest bench/test_bench_layer.py                      # GPU: real shapes, bf16, graph replay
    SERE_BENCH_SIZE=real|small    force the shapes (default: real on CUDA, small on the CPU)
    SERE_BENCH_ROUTING=uniform,zipf:1.2,trace:PATH[@LAYER]   routings to run (bench/routing.py)
    SERE_BENCH_BACKEND=auto|torch|numba   the re-routing backend (default auto)
    SERE_BENCH_ZOO=0              leave out the zoo cases (below)
    pytest bench/test_bench_layer.py -k zoo               # only the zoo cases

The layer is the transformers MoE block of each model (Qwen2MoeSparseMoeBlock, DeepseekV2Moe,
Qwen3MoeSparseMoeBlock) built from the published config (sere.harness.model_configs.real_config) with
random weights, experts through transformers' `grouped_mm` experts implementation. On the CPU
the shapes shrink (hidden 256, intermediate sizes / 16) but E and k stay: they decide how many
experts a batch activates. The router is a `ScriptedTopKRouter`: it does a real router's work
(linear, softmax, top-k) and then returns the case's routing (uniform, Zipf or a replayed
trace), so that the routing is known and stated. SERE runs through `sere.hf.enable` (a forward
hook on the router; backend "auto": the Numba kernel on CUDA, torch on the CPU) with a
synthetic similarity (bench/routing.py) unless a trace brings its own.

Zoo cases (on every device, at their own size: they are small): the MoE layer shapes of the
three trained zoo models (tests/zoo/<model>/config.json: E = 32 top-4 / 32 top-4 / 64 top-8,
hidden 128), random weights, routing replayed from the trace recorded on that model
(bench/traces/<model>.safetensors, first MoE layer, made by bench/record_traces.py) and SERE on
the model's own calibrated similarity stored in the trace; stock and the paper's two settings
(sere.harness.settings) at ZOO_BATCHES. Their extra_info says `routing=trace:<model>.safetensors@<layer>`.

Every case first checks its output: the ids reaching the experts equal the router's ids
(stock) or `sere.reroute(backend="reference")` of them (SERE), and the output is finite.
Then it is timed: on the GPU by CUDA-graph replay (bench/timing.py `benchmark_device`), on the
CPU by pytest-benchmark. Cold weights: on the GPU the bench holds GPU_COPIES independent copies
of the layer and each timed call runs the next copy, as a model's successive layers would; a
single layer called again and again would find its few activated experts still in the 50 MB
L2 (one Qwen3-30B-A3B expert is 9.4 MB) and flatter SERE.

extra_info holds the routing and similarity used, activated experts before/after, bytes of
expert weights read (activated routed experts + the shared expert; router weights left out),
achieved GB/s, the HBM floor (those bytes / measured copy bandwidth) and its share of the
measured time, and the speed-up against the stock case of the same model, routing and batch
measured earlier in the same run (stock cases come first). Results: bench/results/layer.md.
Index letters: T = tokens (batch of decode steps), k = experts per token, E = experts,
H = hidden size, I = expert intermediate size.
"""
from __future__ import annotations

import importlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sere.hf
from bench.extra_info import floor_info, layer_expert_bytes
from bench.routing import make_routing, similarity_for
from bench.timing import benchmark_device
from sere import reroute, reroute_with_stats
from sere.harness.model_configs import REAL_MODELS, layer_shapes, real_config
from sere.harness.settings import DECODE_BATCHES, STOCK_AND_GRID, STOCK_AND_PAPER
from sere.routing import resolve_backend
from sere.stats import distinct_experts

SIZE = os.environ.get("SERE_BENCH_SIZE") or ("real" if torch.cuda.is_available() else "small")
if SIZE not in ("real", "small"):
    raise ValueError(f"SERE_BENCH_SIZE must be 'real' or 'small', got {SIZE!r}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

BATCHES_SMALL = (1, 16, 64)
ROUTINGS_DEFAULT = ("uniform", "zipf:1.2")
SMALL_HIDDEN, SMALL_SHRINK = 256, 16
SEED = 0
GPU_COPIES = 8  # distinct copies of the layer, called in turn (cold L2, see the docstring)
GPU_CALLS, GPU_ROUNDS = 3 * GPU_COPIES, 10  # calls per captured graph, timed replays

# The first routing gets every setting at real size; the others (and the CPU) the paper's two.
SETTINGS = STOCK_AND_GRID if SIZE == "real" else STOCK_AND_PAPER
BATCHES = DECODE_BATCHES if SIZE == "real" else BATCHES_SMALL
BACKEND = os.environ.get("SERE_BENCH_BACKEND", "auto")
ZOO_BATCHES = (1, 16, 64, 256)  # the traces hold 1024 tokens per layer
ZOO_TRACE_DIR = Path(__file__).resolve().parent / "traces"
ZOO_PREFIX = "zoo/"  # model key of a zoo case: zoo/<name>, <name> one of sere.harness.zoo.ZOO_MODELS
WITH_ZOO = os.environ.get("SERE_BENCH_ZOO", "1") != "0"
ROUTINGS = tuple(s.strip() for s in os.environ.get("SERE_BENCH_ROUTING", ",".join(ROUTINGS_DEFAULT)).split(",") if s.strip())

_BLOCKS = {
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Moe"),
}


def zoo_trace_spec(name: str) -> str:
    """Routing spec replaying zoo model `name`'s recorded trace."""
    return f"trace:{ZOO_TRACE_DIR / f'{name}.safetensors'}"


def bench_config(model: str):
    """The model's config at the size this run uses (see SIZE); a zoo model's as trained."""
    if model.startswith(ZOO_PREFIX):
        from transformers import AutoConfig

        from sere.harness.zoo import model_dir

        return AutoConfig.from_pretrained(model_dir(model[len(ZOO_PREFIX):]))
    cfg = real_config(model)
    if SIZE == "real":
        return cfg
    shrink = dict(hidden_size=SMALL_HIDDEN, moe_intermediate_size=cfg.moe_intermediate_size // SMALL_SHRINK)
    if cfg.model_type == "qwen2_moe":
        shrink["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size // SMALL_SHRINK
    return real_config(model, **shrink)


class ScriptedTopKRouter(torch.nn.Module):
    """A router that costs what a transformers top-k router costs (linear, softmax, top-k)
    and answers with a scripted routing, so that a bench knows and states its routing.
    The class name ends in TopKRouter: sere.hf finds it like any transformers router."""

    def __init__(self, weight: torch.Tensor, top_k: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)  # E, H
        self.num_experts, self.top_k = weight.shape[0], top_k
        self.scripted_ids: torch.Tensor | None = None
        self.scripted_weights: torch.Tensor | None = None

    def script(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        dev = self.weight.device
        self.scripted_ids = ids.to(dev)  # T, k
        self.scripted_weights = weights.to(dev, self.weight.dtype)  # T, k

    def forward(self, hidden_states):
        h = hidden_states.reshape(-1, self.weight.shape[1])  # T, H
        logits = F.linear(h, self.weight)  # T, E
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # T, E
        torch.topk(probs, self.top_k, dim=-1)  # the real router's work; the script answers instead
        if self.scripted_ids is None or self.scripted_ids.shape[0] != h.shape[0]:
            raise RuntimeError(f"ScriptedTopKRouter has no routing scripted for {h.shape[0]} tokens")
        return logits, self.scripted_weights, self.scripted_ids


class LayerStack(torch.nn.Module):
    """Copies of the block at `layers.i.mlp`, where sere.hf looks for MoE layers in a
    transformers model; `block(i)` is copy i. The copies are never chained: each takes the
    same input, so every copy sees the same routing."""

    def __init__(self, blocks):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for block in blocks:
            holder = torch.nn.Module()
            holder.mlp = block
            self.layers.append(holder)

    def block(self, i: int) -> torch.nn.Module:
        return self.layers[i].mlp

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class Layer:
    stack: LayerStack
    config: object
    experts_impl: str


_layers: dict[str, Layer] = {}

GPU_CACHE = _layers  # emptied when the module ends (bench/conftest.py)


def _experts_impl() -> str:
    """transformers' grouped_mm experts path where this transformers has it, else eager."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return "eager"
    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "eager"


def _build_block(cfg, gen):
    module, cls = _BLOCKS[cfg.model_type]
    with torch.device(DEVICE):
        block = getattr(importlib.import_module(module), cls)(cfg).to(DTYPE)
    with torch.no_grad():
        for p in block.parameters():  # experts are torch.empty: draw every weight
            p.normal_(0.0, 0.02, generator=gen)
    block.gate = ScriptedTopKRouter(block.gate.weight, cfg.num_experts_per_tok)
    return block.eval()


def get_layer(model: str) -> Layer:
    """The model's MoE layer(s) on DEVICE in DTYPE, built once per model (one model in memory
    at a time: 8 copies of Qwen3-30B-A3B's layer take 9.7 GB in bf16)."""
    if model in _layers:
        return _layers[model]
    _layers.clear()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    cfg = bench_config(model)
    cfg._experts_implementation = impl = _experts_impl()
    gen = torch.Generator(DEVICE).manual_seed(SEED)
    copies = GPU_COPIES if DEVICE == "cuda" else 1
    _layers[model] = Layer(LayerStack([_build_block(cfg, gen) for _ in range(copies)]), cfg, impl)
    return _layers[model]


# --- cases ------------------------------------------------------------------------------


def _cases():
    out = []
    for model in REAL_MODELS:
        for routing in ROUTINGS:
            settings = SETTINGS if routing == ROUTINGS[0] else STOCK_AND_PAPER
            for T in BATCHES:
                for s in settings:
                    out.append(pytest.param(model, routing, T, s.label, s.S, s.rho, id=f"{model}-{routing}-T{T}-{s.label}"))
    if WITH_ZOO:
        from sere.harness.zoo import ZOO_MODELS

        for name in ZOO_MODELS:
            for T in ZOO_BATCHES:
                for s in STOCK_AND_PAPER:
                    out.append(pytest.param(ZOO_PREFIX + name, zoo_trace_spec(name), T, s.label, s.S, s.rho,
                                            id=f"zoo-{name}-trace-T{T}-{s.label}"))
    return out


def _run_and_capture(stack: LayerStack, x: torch.Tensor):
    """Run every copy once; the ids each copy's experts received and each output."""
    seen, handles = {}, []
    for i in range(len(stack)):
        def grab(module, args, i=i):
            seen[i] = args[1].detach().cpu().long()
        handles.append(stack.block(i).experts.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            outs = [stack.block(i)(x) for i in range(len(stack))]
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(stack))], outs


def time_layer(benchmark, stack: LayerStack, x: torch.Tensor, experts_impl: str) -> tuple[float | None, str]:
    """(median seconds per layer call or None with benchmarks disabled, how it was timed).
    GPU: CUDA-graph replay of calls cycling through the copies (CUDA events around eager calls
    where the experts path cannot be captured); CPU: pytest-benchmark around one call."""
    if DEVICE == "cuda":
        turn = itertools.count()

        def next_layer():
            return stack.block(next(turn) % len(stack))(x)

        # transformers' eager experts loop syncs with the host (nonzero): it cannot be captured.
        method = "graph" if experts_impl == "grouped_mm" else "events"
        with torch.no_grad():
            benchmark_device(benchmark, next_layer, method=method, calls=GPU_CALLS, rounds=GPU_ROUNDS)
        how = f"{'cuda-graph replay' if method == 'graph' else 'cuda events, eager'}, {GPU_CALLS} calls over {len(stack)} layer copies"
    else:
        with torch.no_grad():
            benchmark(stack.block(0), x)
        how = "pytest-benchmark (host clock), one thread"
    stats = getattr(benchmark, "stats", None)
    return (float(stats.stats.median) if stats is not None else None), how


@pytest.mark.parametrize(("model", "routing", "T", "setting", "S", "rho"), _cases())
def test_moe_layer(benchmark, copy_bandwidth, stock_times, model, routing, T, setting, S, rho):
    layer = get_layer(model)
    shapes = layer_shapes(layer.config)
    E, k, H = shapes.num_experts, shapes.top_k, shapes.hidden_size
    try:
        r = make_routing(routing, T, E, k, seed=SEED)
    except ValueError as exc:  # e.g. a trace recorded with another E or k
        if model.startswith(ZOO_PREFIX):  # a zoo model's own trace must fit it: fail, never skip
            raise
        pytest.skip(str(exc))
    sim, sim_label = similarity_for(routing, E, seed=SEED)
    if model.startswith(ZOO_PREFIX) and not sim_label.startswith("trace:"):
        raise AssertionError(f"{routing} holds no calibrated similarity for the replayed layer (got {sim_label})")
    stack = layer.stack
    for i in range(len(stack)):
        stack.block(i).gate.script(r.ids, r.weights)
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(SEED + T)).to(DEVICE, DTYPE)  # 1, T, H

    handle = None
    if S is not None:
        sims = {i: sim for i in range(len(stack))}
        handle = sere.hf.enable(stack, sims, select_top_k=S, threshold=rho, record_stats=False, backend=BACKEND)
    try:
        # Validate first: the ids every copy's experts see, and a finite output.
        got, outs = _run_and_capture(stack, x)
        want = r.ids if S is None else reroute(r.ids, sim, S, rho, backend="reference")
        for ids in got:
            torch.testing.assert_close(ids, want.long(), rtol=0, atol=0)
        assert all(torch.isfinite(o).all() for o in outs), "MoE layer output has NaN/inf"
        seconds, timer = time_layer(benchmark, stack, x, layer.experts_impl)
    finally:
        if handle is not None:
            handle.remove()

    if S is None:
        before = after = int(distinct_experts(r.ids, E))
        rerouted = critical = 0
    else:
        stats = reroute_with_stats(r.ids, sim, S, rho, backend="torch")[1].as_dict()
        before, after, rerouted, critical = (stats[f] for f in ("experts_before", "experts_after", "rerouted", "critical"))
    expert_bytes = layer_expert_bytes(shapes, after, DTYPE)
    speedup = stock_times.speedup_vs_stock((model, routing, T), seconds, stock=S is None)
    benchmark.extra_info.update(
        model=model, arch=shapes.arch, size="zoo" if model.startswith(ZOO_PREFIX) else SIZE, device=DEVICE, dtype=str(DTYPE).removeprefix("torch."),
        E=E, k=k, hidden=H, moe_intermediate=shapes.moe_intermediate_size,
        shared_intermediate=shapes.shared_intermediate_size, experts_impl=layer.experts_impl,
        timer=timer,
        routing=r.label, similarity=sim_label, tokens=T, setting=setting, S=S, rho=rho,
        sere_backend=None if S is None else resolve_backend(BACKEND, torch.device(DEVICE)),
        experts_before=before, experts_after=after, rerouted=rerouted, critical=critical,
        expert_bytes=expert_bytes, **floor_info(expert_bytes, seconds, copy_bandwidth), speedup_vs_stock=speedup,
    )
