"""Tests of the benchmarks' routing generators and trace format (bench/routing.py) and of the
real-size model configs (sere.harness.model_configs.real_config / layer_shapes).

    pytest tests/test_bench_routing.py
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from bench import routing
from sere.harness.model_configs import REAL_MODELS, build_tiny_model, layer_shapes, real_config

# (T, E, k): extremes and odd sizes.
SIZES = ((1, 8, 1), (33, 60, 4), (256, 128, 8), (5, 6, 6))


@pytest.mark.parametrize(("T", "E", "k"), SIZES)
@pytest.mark.parametrize("spec", ["uniform", "zipf:1.2"])
def test_generated_routing_looks_like_a_router_topk(spec, T, E, k):
    r = routing.make_routing(spec, T, E, k, seed=3)
    assert r.ids.shape == r.weights.shape == (T, k)
    assert r.ids.dtype == torch.int64 and ((r.ids >= 0) & (r.ids < E)).all()
    assert all(len(set(row.tolist())) == k for row in r.ids), "experts of a token must be distinct"
    assert (r.weights[:, :-1] >= r.weights[:, 1:]).all(), "slot 0 must hold the largest weight"
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(T))
    assert r.label == spec
    again = routing.make_routing(spec, T, E, k, seed=3)
    assert torch.equal(again.ids, r.ids)


def test_seed_changes_the_routing():
    a = routing.uniform_routing(64, 128, 8, seed=0)
    b = routing.uniform_routing(64, 128, 8, seed=1)
    assert not torch.equal(a.ids, b.ids)


def test_zipf_skews_the_load():
    T, E, k = 256, 128, 8
    uni = routing.uniform_routing(T, E, k, seed=0)
    zipf = routing.zipf_routing(T, E, k, 1.5, seed=0)
    # Skew concentrates the batch on fewer experts...
    assert torch.unique(zipf.ids).numel() < torch.unique(uni.ids).numel()
    # ...and the most loaded expert takes a far larger share than under uniform routing.
    assert torch.bincount(zipf.ids.flatten(), minlength=E).max() > 3 * torch.bincount(uni.ids.flatten(), minlength=E).max()


def test_zipf_zero_is_uniform_and_negative_is_refused():
    assert routing.zipf_routing(4, 8, 2, 0.0).label == "uniform"
    with pytest.raises(ValueError, match="Zipf exponent"):
        routing.zipf_routing(4, 8, 2, -1.0)


@pytest.mark.parametrize(("spec", "message"), [("zipf:abc", "bad Zipf spec"), ("normal", "unknown routing spec"),
                                               ("uniform", None)])
def test_bad_specs_and_sizes(spec, message):
    if message:
        with pytest.raises(ValueError, match=message):
            routing.make_routing(spec, 4, 8, 2)
    with pytest.raises(ValueError, match="1 <= k <= E"):
        routing.make_routing("uniform", 4, 8, 9)
    with pytest.raises(ValueError, match="at least one token"):
        routing.make_routing("uniform", 0, 8, 2)


@pytest.mark.parametrize("E", [1, 8, 60])
def test_synthetic_similarity(E):
    sim = routing.synthetic_similarity(E, seed=2)
    assert sim.shape == (E, E) and sim.dtype == torch.float32
    assert torch.equal(sim, sim.T)
    assert torch.equal(sim.diagonal(), torch.ones(E))
    assert ((sim >= 0) & (sim <= 1)).all()


# --- traces ---------------------------------------------------------------------------


@pytest.fixture
def trace_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ids = {l: torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(40)]) for l in (1, 3)}
    sim = {3: routing.synthetic_similarity(16, seed=9)}
    path = routing.save_trace(tmp_path / "t.safetensors", ids, num_experts=16, model="toy", source="unit test",
                              similarity=sim)
    return path, ids, sim


def test_trace_round_trip_and_replay(trace_file):
    path, ids, sim = trace_file
    trace = routing.load_trace(path)
    assert (trace.num_experts, trace.top_k, trace.model, trace.layers) == (16, 4, "toy", [1, 3])
    assert torch.equal(trace.ids[3].long(), ids[3])
    r = routing.make_routing(f"trace:{path}@3", 33, 16, 4, seed=1)
    assert r.ids.shape == (33, 4) and r.label == "trace:t.safetensors@3"
    pool = {tuple(row) for row in ids[3].tolist()}
    rows = [tuple(row) for row in r.ids.tolist()]
    assert set(rows) <= pool and len(set(rows)) == 33, "replay draws distinct recorded tokens"
    got_sim, label = routing.similarity_for(f"trace:{path}@3", 16)
    assert torch.equal(got_sim, sim[3]) and label.startswith("trace:")
    # Layer 1 has no similarity in the file: the synthetic one stands in, and says so.
    assert routing.similarity_for(f"trace:{path}@1", 16)[1].startswith("synthetic")


def test_trace_replay_refuses_what_it_cannot_do(trace_file):
    path, _, _ = trace_file
    with pytest.raises(ValueError, match="recorded with E=16, k=4"):
        routing.make_routing(f"trace:{path}", 8, 60, 4)
    with pytest.raises(ValueError, match="fewer than the batch"):
        routing.make_routing(f"trace:{path}", 41, 16, 4)
    with pytest.raises(ValueError, match="no layer 2"):
        routing.make_routing(f"trace:{path}@2", 4, 16, 4)


def test_load_trace_rejects_other_files(tmp_path):
    pkl = tmp_path / "x.safetensors"
    pkl.write_bytes(pickle.dumps({"ids": [1, 2]}))
    with pytest.raises(ValueError, match="not a safetensors routing trace"):
        routing.load_trace(pkl)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"layer.0.topk_ids": torch.zeros(2, 2, dtype=torch.int32)}, str(other), metadata={"format": "x"})
    with pytest.raises(ValueError, match="metadata format"):
        routing.load_trace(other)
    with pytest.raises(FileNotFoundError):
        routing.load_trace(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="one k for all layers"):
        routing.save_trace(tmp_path / "y.safetensors", {0: torch.zeros(3, 2), 1: torch.zeros(3, 4)},
                           num_experts=8, model="m", source="s")


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_record_trace_from_a_transformers_model(tmp_path, arch):
    model = build_tiny_model(arch, seed=0)
    batches = [torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rec = routing.record_trace(model, batches, source="unit test")
    moe_layers = [1, 2] if arch == "deepseek_v2" else [0, 1]  # DeepSeek's first layer is dense
    assert sorted(rec["ids"]) == moe_layers
    assert all(t.shape == (2 * 2 * 5, 4) for t in rec["ids"].values())
    trace = routing.load_trace(routing.save_trace(tmp_path / "rec.safetensors", **rec))
    assert trace.num_experts == 8 and trace.layers == moe_layers
    with pytest.raises(ValueError, match="no transformers MoE router"):
        routing.record_trace(torch.nn.Linear(2, 2), [], source="x")


# --- traces recorded on the zoo models (bench/traces, bench/record_traces.py) ---------------

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
ZOO_TRACE_TOKENS = 1024  # 32 sequences x 32 decode steps, see bench/record_traces.py


def _zoo_config(name):
    from transformers import AutoConfig

    from sere.harness.zoo import model_dir

    return AutoConfig.from_pretrained(model_dir(name))


def test_zoo_trace_files_are_small():
    files = sorted((BENCH_DIR / "traces").glob("*.safetensors"))
    from sere.harness.zoo import ZOO_MODELS

    assert [f.stem for f in files] == sorted(ZOO_MODELS)
    # 1024 tokens x top-k ids and weights per MoE layer plus the [E, E] similarity: qwen3_moe's
    # 128 experts x 3 layers make it the largest (385 KiB); the four together stay under 1 MiB
    assert sum(f.stat().st_size for f in files) < 1024 * 1024


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v2", "qwen3_moe", "qwen2_moe_upcycled"])
def test_zoo_trace_matches_its_model(name):
    from sere.artifact import load_similarity, moe_layer_indices
    from sere.harness.model_configs import num_experts_of
    from sere.harness.zoo import model_dir

    cfg = _zoo_config(name)
    trace = routing.load_trace(BENCH_DIR / "traces" / f"{name}.safetensors")
    assert (trace.num_experts, trace.top_k, trace.model) == (num_experts_of(cfg), cfg.num_experts_per_tok, f"zoo/{name}")
    assert trace.layers == moe_layer_indices(cfg) == sorted(trace.weights) == sorted(trace.similarity)
    calibrated = load_similarity(model_dir(name), config=cfg).matrices
    for layer in trace.layers:
        ids, w = trace.ids[layer].long(), trace.weights[layer]  # N, k
        assert ids.shape == w.shape == (ZOO_TRACE_TOKENS, trace.top_k)
        assert ((ids >= 0) & (ids < trace.num_experts)).all()
        assert (torch.sort(ids, 1).values.diff(dim=1) > 0).all(), "experts of a token must be distinct"
        assert (w[:, :-1] >= w[:, 1:]).all(), "slot 0 must hold the largest weight (DeepSeek's top-k is unsorted)"
        assert torch.equal(trace.similarity[layer], calibrated[layer]), "the trace must carry the calibrated similarity"
        # A trained router spreads its load, but not evenly: neither one expert nor uniform.
        load = torch.bincount(ids.flatten(), minlength=trace.num_experts)
        assert 1 < torch.count_nonzero(load) and load.max() > 1.5 * load.float().mean()


@pytest.mark.parametrize(("name", "T", "layer"), [("qwen2_moe", 1, None), ("deepseek_v2", 33, 2), ("qwen3_moe", 1024, 1)])
def test_zoo_trace_replay_gives_the_recorded_ids(name, T, layer):
    path = BENCH_DIR / "traces" / f"{name}.safetensors"
    trace = routing.load_trace(path)
    spec = f"trace:{path}" + (f"@{layer}" if layer is not None else "")
    r = routing.make_routing(spec, T, trace.num_experts, trace.top_k, seed=5)
    want_layer = trace.layers[0] if layer is None else layer
    rows = torch.randperm(ZOO_TRACE_TOKENS, generator=torch.Generator().manual_seed(5))[:T]  # T
    assert torch.equal(r.ids, trace.ids[want_layer][rows].long())
    assert torch.equal(r.weights, trace.weights[want_layer][rows])
    assert r.label == f"trace:{name}.safetensors@{want_layer}"
    sim, label = routing.similarity_for(spec, trace.num_experts)
    assert torch.equal(sim, trace.similarity[want_layer]) and label == r.label


class _DisabledBenchmark:
    """What pytest-benchmark's fixture does under --benchmark-disable: call once, keep no stats
    (`benchmark(fn, *args)` on the CPU path, `benchmark.pedantic(fn, ...)` on the GPU path)."""

    disabled = True

    def __init__(self):
        self.extra_info, self.stats = {}, None

    def __call__(self, fn, *args):
        return fn(*args)

    def pedantic(self, fn, args=(), **_):
        return fn(*args)


def test_zoo_trace_bench_cases_run_in_smoke_mode():
    """Every zoo case of the layer bench (bench/test_bench_layer.py) validates its output
    (ids reaching the experts = reference re-routing, finite output) and fills extra_info."""
    from bench import test_bench_layer as layer_bench
    from bench.extra_info import StockTimes
    from sere.harness.settings import STOCK_AND_PAPER
    from sere.harness.zoo import ZOO_MODELS

    cases = [c for c in layer_bench._cases() if c.id.startswith("zoo-")]
    assert len(cases) == len(ZOO_MODELS) * len(layer_bench.ZOO_BATCHES) * len(STOCK_AND_PAPER)
    stock_times, infos = StockTimes(), {}
    for case in cases:
        bench = _DisabledBenchmark()
        layer_bench.test_moe_layer(bench, 1e10, stock_times, *case.values)
        infos[case.id] = info = bench.extra_info
        name = case.values[0].removeprefix("zoo/")
        assert info["routing"].startswith(f"trace:{name}.safetensors@") and info["similarity"] == info["routing"]
        assert info["size"] == "zoo" and info["time_us"] is None
        assert 1 <= info["experts_after"] <= info["experts_before"] <= info["E"]
    # S = 1, rho = 0 keeps only the batch's primary experts: fewer than stock from 16 tokens on.
    for name in ("qwen2_moe", "deepseek_v2", "qwen3_moe"):
        stock, s1 = infos[f"zoo-{name}-trace-T16-stock"], infos[f"zoo-{name}-trace-T16-S1-rho0"]
        assert s1["experts_after"] < stock["experts_after"] == s1["experts_before"]


# --- real-size configs ------------------------------------------------------------------

# name -> (arch, E, k, hidden, moe_intermediate, shared intermediate), from the published configs.
PUBLISHED = {
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", 60, 4, 2048, 1408, 5632),
    "DeepSeek-V2-Lite": ("deepseek_v2", 64, 6, 2048, 1408, 2816),
    "Qwen3-30B-A3B": ("qwen3_moe", 128, 8, 2048, 768, 0),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_real_configs_match_the_published_shapes(name):
    s = layer_shapes(name)
    assert (s.arch, s.num_experts, s.top_k, s.hidden_size, s.moe_intermediate_size,
            s.shared_intermediate_size) == PUBLISHED[name]
    assert s.expert_params() == 3 * s.hidden_size * s.moe_intermediate_size
    cfg = real_config(name.lower())  # names are case-insensitive
    assert cfg.model_type == s.arch and cfg._name_or_path == name


# Published parameter counts (model cards): total, and activated per token where the card
# counts it the way WeightCounts does (DeepSeek's 2.4B leaves out its embedding).
PUBLISHED_PARAMS = {"Qwen1.5-MoE-A2.7B": (14.3e9, 2.7e9), "DeepSeek-V2-Lite": (15.7e9, None),
                    "Qwen3-30B-A3B": (30.5e9, 3.3e9)}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_weight_counts_match_the_published_sizes(name):
    from sere.harness.model_configs import weight_counts

    total, active = PUBLISHED_PARAMS[name]
    w = weight_counts(name)
    assert w.total == pytest.approx(total, rel=0.01)
    assert w.moe_layers == {"Qwen1.5-MoE-A2.7B": 24, "DeepSeek-V2-Lite": 26, "Qwen3-30B-A3B": 48}[name]
    assert 0 < w.always_read < w.total and w.routed_experts == w.moe_layers * w.shapes.num_experts * w.shapes.expert_params()
    if active is not None:
        assert w.read_per_step(w.shapes.top_k) == pytest.approx(active, rel=0.02)
    assert w.read_per_step(0) == w.always_read
    assert w.read_per_step(w.shapes.num_experts) == w.total


def test_weight_counts_refuse_a_dense_model():
    import transformers as tf

    from sere.harness.model_configs import weight_counts

    with pytest.raises(ValueError, match="no '.mlp.experts'"):
        weight_counts(tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))


def test_real_config_details_and_errors():
    assert set(REAL_MODELS) == set(PUBLISHED)
    ds = real_config("DeepSeek-V2-Lite")
    assert (ds.first_k_dense_replace, ds.num_hidden_layers, ds.kv_lora_rank, ds.q_lora_rank) == (1, 27, 512, None)
    assert ds.rope_parameters["rope_type"] == "yarn" and ds.rope_parameters["factor"] == 40.0
    q3 = real_config("Qwen3-30B-A3B", num_hidden_layers=2)
    assert (q3.num_hidden_layers, q3.num_key_value_heads, q3.head_dim, q3.norm_topk_prob) == (2, 4, 128, True)
    assert real_config("Qwen1.5-MoE-A2.7B").norm_topk_prob is False
    assert layer_shapes("Qwen1.5-MoE-A2.7B").shared_params() == 3 * 2048 * 5632 + 2048
    with pytest.raises(ValueError, match="unknown model"):
        real_config("Mixtral-8x7B")
