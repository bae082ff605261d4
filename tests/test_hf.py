"""SERE in transformers (sere.hf) on the tiny random models of every supported family, and the
shared statistics recorder (sere.recorder).

    pytest tests/test_hf.py

Models are built locally from configs (sere.harness.model_configs), 8 experts, top-4. The ids that
reach the experts are captured with a forward pre-hook on each block's `experts` module.
Index letters: T = tokens (batch * length, flattened), k = experts per token, E = experts.
"""
import numpy as np
import pytest
import torch

import sere
import sere.hf
import sere.rerouter
from sere.harness import methods
from sere.harness.model_configs import TINY_ARCHS, build_tiny_model
from sere.recorder import FIELDS, ExpertStatsRecorder

E, K = 8, 4  # every tiny model
BATCH, LENGTH = 3, 7
MOE_LAYERS = {"deepseek_v2": [1, 2]}  # its first layer is dense; the others have layers 0 and 1

# Settings under which SERE must move nothing: S >= k, S = 0, and rho above every similarity.
IDENTITY_SETTINGS = [(K, 0.0), (K + 3, 0.0), (0, 0.0), (1, 1.5)]


def moe_layers(arch):
    return MOE_LAYERS.get(arch, [0, 1])


def similarity_for(arch, seed=0):
    """{layer: [E, E]} in [0, 1), no ties (so the reference's tie rule is not exercised here)."""
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.rand(E, E, generator=gen) for layer in moe_layers(arch)}


def token_batch(seed=0, batch=BATCH, length=LENGTH):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 256, (batch, length), generator=gen)  # B, L


def few_tokens():
    """2 x 2 = 4 tokens: at most 4 primary experts of 8 with S = 1, so secondaries must move
    (with BATCH * LENGTH = 21 tokens every expert is often primary somewhere)."""
    return token_batch(batch=2, length=2)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


class RoutingCapture:
    """Per MoE layer: the router's (ids, weights) as the router returned them, and the
    (ids, weights) the experts module received. Register before `enable` so the router
    hook here sees the router's own output."""

    def __init__(self, model):
        self.router, self.experts, self._hooks = {}, {}, []
        for site in sere.hf.find_routers(model):
            block = model.get_submodule(site.name.rpartition(".")[0])
            self._hooks.append(site.module.register_forward_hook(self._on_router(site.layer)))
            self._hooks.append(block.experts.register_forward_pre_hook(self._on_experts(site.layer)))

    def _on_router(self, layer):
        def hook(module, args, output):
            self.router[layer] = (output[2].clone(), output[1].clone())

        return hook

    def _on_experts(self, layer):
        def hook(module, args):
            self.experts[layer] = (args[1].clone(), args[2].clone())

        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()


def expected_ids(router_ids, router_weights, transform):
    """What the hook must produce: the transform applied in weight order (slot 0 = largest
    weight, ties in slot order), each id written back to the slot it came from. Plain loops."""
    ids, w = router_ids.numpy(), router_weights.float().numpy()
    T, k = ids.shape
    orders = [sorted(range(k), key=lambda s: (-w[t, s], s)) for t in range(T)]
    in_order = np.array([[ids[t, s] for s in orders[t]] for t in range(T)]).reshape(T, k)
    moved = transform(in_order)
    out = ids.copy()
    for t in range(T):
        for j, s in enumerate(orders[t]):
            out[t, s] = moved[t, j]
    return torch.from_numpy(out)


def sere_reference(sim, S, rho):
    return lambda ids: sere.reroute(torch.from_numpy(ids), sim, S, rho, backend="reference").numpy()


# ---- discovery ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_finds_every_moe_router(arch):
    model = build_tiny_model(arch)
    sites = sere.hf.find_routers(model)
    assert [s.layer for s in sites] == moe_layers(arch)
    assert all(s.num_experts == E and s.name == f"model.layers.{s.layer}.mlp.gate" for s in sites)


# ---- identity: bit-identical logits -----------------------------------------------------------


@pytest.mark.parametrize("S,rho", IDENTITY_SETTINGS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_identity_settings_give_bit_identical_logits(arch, S, rho):
    model = build_tiny_model(arch)
    ids = token_batch()
    stock = logits(model, ids)
    with sere.hf.enable(model, similarity_for(arch), select_top_k=S, threshold=rho) as handle:
        got = logits(model, ids)
        rows = handle.stats.rows()
    assert torch.equal(got, stock)
    # The hooks did run (one row per layer) and moved nothing.
    assert [r["layer"] for r in rows] == moe_layers(arch)
    assert all(r["rerouted"] == 0 and r["experts_after"] == r["experts_before"] for r in rows)


def test_identity_settings_bit_identical_in_bf16():
    model = build_tiny_model("qwen3_moe", dtype=torch.bfloat16)
    ids = token_batch()
    stock = logits(model, ids)
    sims = {k: v.to(torch.bfloat16) for k, v in similarity_for("qwen3_moe").items()}
    with sere.hf.enable(model, sims, select_top_k=1, threshold=1.5):
        assert torch.equal(logits(model, ids), stock)


# ---- S = 1, rho = 0: the experts receive the reference's ids ------------------------------


@pytest.mark.parametrize("sort_slots", [None, True])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_experts_receive_reference_rerouted_ids(arch, sort_slots):
    """Both the default (sort unless the router is known to sort) and an explicit sort give
    the contract's result in weight order."""
    model = build_tiny_model(arch)
    sims = similarity_for(arch)
    capture = RoutingCapture(model)
    handle = sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, backend="torch", sort_slots=sort_slots)
    logits(model, few_tokens())
    handle.remove()
    capture.remove()
    for layer in moe_layers(arch):
        r_ids, r_w = capture.router[layer]
        x_ids, x_w = capture.experts[layer]
        assert r_ids.shape == (2 * 2, K)  # flattened tokens
        want = expected_ids(r_ids, r_w, sere_reference(sims[layer], 1, 0.0))
        assert torch.equal(x_ids, want)
        assert torch.equal(x_w, r_w)  # weights untouched
        assert not torch.equal(x_ids, r_ids)  # something did move
        if bool((r_w[:, :-1] >= r_w[:, 1:]).all()):  # the router sorts: no reordering needed
            assert torch.equal(x_ids, sere.reroute(r_ids, sims[layer], 1, 0.0, backend="reference"))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_known_sorted_routers_do_return_sorted_weights(arch):
    """sere.hf skips the slot sort for sere.rerouter.SORTED_ROUTERS: each must really return descending
    weights (here over 512 random tokens), and the others must need the sort."""
    model = build_tiny_model(arch)
    site = sere.hf.find_routers(model)[0]
    hidden = torch.randn(512, model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # T, H
    with torch.no_grad():
        weights = site.module(hidden)[1]  # T, k
    is_sorted = bool((weights[:, :-1] >= weights[:, 1:]).all())
    assert is_sorted == sere.rerouter.router_returns_sorted(site.module), type(site.module).__name__


def test_sort_slots_false_trusts_the_router_order():
    """An explicit sort_slots=False re-routes the slots as the router ordered them (here
    DeepSeek-V2's unsorted order), which differs from the weight-order result."""
    model = build_tiny_model("deepseek_v2")
    sims = similarity_for("deepseek_v2")
    capture = RoutingCapture(model)
    with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, backend="torch", sort_slots=False):
        logits(model, token_batch())
    capture.remove()
    r_ids, r_w = capture.router[1]
    x_ids = capture.experts[1][0]
    assert torch.equal(x_ids, sere.reroute(r_ids, sims[1], 1, 0.0, backend="reference"))
    assert not torch.equal(x_ids, expected_ids(r_ids, r_w, sere_reference(sims[1], 1, 0.0)))


def test_deepseek_router_is_unsorted_and_is_rerouted_in_weight_order():
    """DeepSeek-V2 returns topk(sorted=False): slot 0 is not always the largest weight. The
    primary set must come from each token's largest-weight expert, not from slot 0."""
    model = build_tiny_model("deepseek_v2")
    capture = RoutingCapture(model)
    sims = similarity_for("deepseek_v2")
    with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0):
        logits(model, token_batch())
    capture.remove()
    r_ids, r_w = capture.router[1]
    assert not bool((r_w[:, :-1] >= r_w[:, 1:]).all()), "router now sorts: this test lost its subject"
    top = r_ids.gather(1, r_w.argmax(dim=1, keepdim=True))  # T, 1: each token's largest-weight expert
    x_ids = capture.experts[1][0]
    assert bool((x_ids == top).any(dim=1).all())  # every token keeps its top expert
    assert set(x_ids.flatten().tolist()) <= set(top.flatten().tolist())  # rho = 0: only primaries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reroute_in_weight_order_commutes_with_slot_permutation(seed):
    gen = torch.Generator().manual_seed(seed)
    T, k = 33, 6
    ids = torch.stack([torch.randperm(16, generator=gen)[:k] for _ in range(T)])  # T, k
    w = torch.rand(T, k, generator=gen)
    sim = torch.rand(16, 16, generator=gen)
    fn = lambda x: sere.reroute(x, sim, 2, 0.3, backend="torch")  # noqa: E731
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(T)])  # T, k
    base, _, _ = sere.rerouter.reroute_in_weight_order(ids, w, fn)
    shuffled, _, _ = sere.rerouter.reroute_in_weight_order(ids.gather(1, perm), w.gather(1, perm), fn)
    assert torch.equal(shuffled, base.gather(1, perm))


# ---- generate, stats, remove ----------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_with_sere_records_stats_per_step(arch):
    model = build_tiny_model(arch)
    ids = token_batch()
    new_tokens = 4
    handle = sere.hf.enable(model, similarity_for(arch), select_top_k=1, threshold=0.0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    handle.remove()
    assert out.shape == (BATCH, LENGTH + new_tokens)
    assert torch.equal(out[:, :LENGTH], ids)
    per_layer = handle.stats.per_layer()
    assert sorted(per_layer) == moe_layers(arch)
    for layer, entry in per_layer.items():
        # One row per forward call: the prefill, then one per decoded token after the first.
        assert entry["step"] == list(range(new_tokens))
        assert entry["tokens"] == [BATCH * LENGTH] + [BATCH] * (new_tokens - 1)
        assert all(a <= b for a, b in zip(entry["experts_after"], entry["experts_before"]))
        # Decode steps: S = 1 and rho = 0 with similarities >= 0 leave only the primaries,
        # at most one per sequence.
        assert all(a <= BATCH for a in entry["experts_after"][1:])
    decode = handle.stats.summary(max_tokens=BATCH)
    assert all(v["steps"] == new_tokens - 1 for v in decode.values())
    assert any(v["mean_experts_after"] < v["mean_experts_before"] for v in decode.values())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_remove_restores_bit_identical_output(arch):
    model = build_tiny_model(arch)
    ids = few_tokens()
    stock = logits(model, ids)
    handle = sere.hf.enable(model, similarity_for(arch), select_top_k=1, threshold=0.0)
    assert not torch.equal(logits(model, ids), stock)  # SERE did change something
    handle.remove()
    handle.remove()  # twice is harmless
    assert not handle.active
    assert torch.equal(logits(model, ids), stock)
    assert all(not s.module._forward_hooks for s in sere.hf.find_routers(model))
    # A removed model can be enabled again.
    sere.hf.enable(model, similarity_for(arch), select_top_k=1, threshold=0.0).remove()


def test_record_stats_off_and_shared_recorder():
    model = build_tiny_model("mixtral")
    with sere.hf.enable(model, similarity_for("mixtral"), select_top_k=1, threshold=0.0, record_stats=False) as h:
        logits(model, token_batch())
        assert h.stats is None
    shared = ExpertStatsRecorder()
    with sere.hf.enable(model, similarity_for("mixtral"), select_top_k=1, threshold=0.0, recorder=shared) as h:
        logits(model, token_batch())
        assert h.stats is shared and len(shared.rows()) == 2


# ---- layer selection, overrides, max_tokens, controls ----------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_layers_and_layer_overrides(arch):
    first, second = moe_layers(arch)
    model = build_tiny_model(arch)
    sims = similarity_for(arch)
    for kwargs in ({"layers": [first]}, {"layer_overrides": {second: {"select_top_k": K}}},
                   {"layer_overrides": {second: {"threshold": 1.5}}}):
        capture = RoutingCapture(model)
        with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, **kwargs) as handle:
            logits(model, few_tokens())
        capture.remove()
        assert not torch.equal(capture.experts[first][0], capture.router[first][0]), kwargs
        assert torch.equal(capture.experts[second][0], capture.router[second][0]), kwargs
        assert handle.layers == ([first] if "layers" in kwargs else [first, second])


def test_layers_subset_needs_similarity_for_those_layers_only():
    model = build_tiny_model("olmoe")
    sims = {0: similarity_for("olmoe")[0]}
    with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, layers=[0]) as handle:
        logits(model, token_batch())
    assert handle.stats.layers() == [0]


def test_max_tokens_leaves_the_prefill_alone():
    model = build_tiny_model("qwen3_moe")
    ids = token_batch()
    handle = sere.hf.enable(model, similarity_for("qwen3_moe"), select_top_k=1, threshold=0.0, max_tokens=BATCH)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    handle.remove()
    for entry in handle.stats.per_layer().values():
        assert entry["tokens"][0] == BATCH * LENGTH and entry["rerouted"][0] == 0
        assert entry["experts_after"][0] == entry["experts_before"][0]
        assert sum(entry["rerouted"][1:]) > 0


@pytest.mark.parametrize("name", ["random", "truncate", "oea"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_controls_run_through_the_same_hook(arch, name):
    model = build_tiny_model(arch)
    sims = similarity_for(arch)
    capture = RoutingCapture(model)
    with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0, method=name, method_options=None):
        logits(model, few_tokens())
    capture.remove()
    layer = moe_layers(arch)[0]  # the first MoE layer sees the stock hidden states
    r_ids, r_w = capture.router[layer]
    if name == "random":  # a fresh RandomReroute(seed=0) draws what the hook drew first
        fn = methods.RandomReroute(seed=0)
        transform = lambda x: fn(torch.from_numpy(x), sims[layer], 1, 0.0).numpy()  # noqa: E731
    else:
        ref = {"truncate": methods.truncate_reference, "oea": methods.oea_reference}[name]
        transform = lambda x: ref(x, sims[layer].numpy(), 1, 0.0)  # noqa: E731
    got = capture.experts[layer][0]
    assert torch.equal(got, expected_ids(r_ids, r_w, transform))
    assert not torch.equal(got, r_ids)


# ---- similarity artifact path -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_similarity_from_artifact_path_matches_dict(arch, tmp_path):
    artifact = pytest.importorskip("sere.artifact")
    sims = similarity_for(arch)
    artifact.save_similarity(tmp_path, sims, {"model_type": build_tiny_model(arch).config.model_type})
    model = build_tiny_model(arch)
    ids = token_batch()
    with sere.hf.enable(model, sims, select_top_k=1, threshold=0.0):
        from_dict = logits(model, ids)
    with sere.hf.enable(model, tmp_path, select_top_k=1, threshold=0.0):
        from_path = logits(model, ids)
    assert torch.equal(from_path, from_dict)


def test_artifact_for_another_expert_count_fails_at_enable(tmp_path):
    artifact = pytest.importorskip("sere.artifact")
    artifact.save_similarity(tmp_path, {0: torch.rand(6, 6), 1: torch.rand(6, 6)})
    with pytest.raises(ValueError, match="6 experts"):
        sere.hf.enable(build_tiny_model("mixtral"), tmp_path, select_top_k=1, threshold=0.0)


def test_missing_artifact_fails_at_enable(tmp_path):
    pytest.importorskip("sere.artifact")
    with pytest.raises(ValueError, match="not found"):
        sere.hf.enable(build_tiny_model("mixtral"), tmp_path / "nowhere", select_top_k=1, threshold=0.0)


# ---- bad inputs fail clearly -----------------------------------------------------------------


def _sims_with(layer_value):
    sims = similarity_for("qwen2_moe")
    sims.update(layer_value)
    return sims


BAD_INPUTS = [
    ({"similarity": _sims_with({1: torch.rand(7, 7)})}, ValueError, r"layer 1 .* shape \(7, 7\).*8 experts"),
    ({"similarity": {0: torch.rand(E, E)}}, ValueError, r"no matrix for MoE layer\(s\) \[1\]"),
    ({"similarity": _sims_with({0: torch.full((E, E), float("nan"))})}, ValueError, "non-finite"),
    ({"similarity": _sims_with({0: [[0.0] * E] * E})}, TypeError, "must be a torch.Tensor"),
    ({"similarity": _sims_with({0: torch.ones(E, E, dtype=torch.int64)})}, TypeError, "floating"),
    ({"similarity": _sims_with({5: torch.rand(E, E)})}, ValueError, r"similarity names layer\(s\) \[5\]"),
    ({"similarity": {"0": torch.rand(E, E)}}, TypeError, "int layer indices"),
    ({"similarity": 3.0}, TypeError, "artifact path or a dict"),
    ({"layers": [0, 9]}, ValueError, r"layers names layer\(s\) \[9\]"),
    ({"layers": []}, ValueError, "selects no MoE layer"),
    ({"layer_overrides": {4: {"select_top_k": 2}}}, ValueError, r"layer_overrides names layer\(s\) \[4\]"),
    ({"layer_overrides": {0: {"topk": 2}}}, ValueError, "unknown key"),
    ({"select_top_k": 1.5}, TypeError, "select_top_k must be an int"),
    ({"threshold": float("nan")}, TypeError, "threshold"),
    ({"method": "nope"}, ValueError, "unknown routing method"),
    ({"method": "truncate", "method_options": {"seed": 1}}, TypeError, "takes no option"),
    ({"backend": "cuda"}, ValueError, "unknown backend"),
]


@pytest.mark.parametrize("override,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_fail_clearly(override, exc, match):
    model = build_tiny_model("qwen2_moe")
    kwargs = dict(similarity=similarity_for("qwen2_moe"), select_top_k=1, threshold=0.0)
    kwargs.update(override)
    sim = kwargs.pop("similarity")
    with pytest.raises(exc, match=match):
        sere.hf.enable(model, sim, **kwargs)
    # Every check runs before any hook is registered: a failed enable leaves the model stock.
    assert all(not s.module._forward_hooks for s in sere.hf.find_routers(model))
    sere.hf.enable(model, similarity_for("qwen2_moe"), select_top_k=1, threshold=0.0).remove()


@pytest.mark.parametrize("vllm_setting", [{"fuse_topk": True}, {"merge_slots": True}, {"primary_set": "global"}],
                         ids=["fuse_topk", "merge_slots", "primary_set"])
def test_vllm_only_settings_are_refused_not_ignored(vllm_setting):
    from sere.config import SereConfig

    model = build_tiny_model("qwen2_moe")
    name = next(iter(vllm_setting))
    with pytest.raises(ValueError, match=f"{name}.*vLLM settings"):
        sere.hf.enable(model, similarity_for("qwen2_moe"), config=SereConfig(select_top_k=1, threshold=0.0, **vllm_setting))
    assert all(not s.module._forward_hooks for s in sere.hf.find_routers(model))
    for merge in (None, False):  # unset or off: nothing to apply
        sere.hf.enable(model, similarity_for("qwen2_moe"),
                       config=SereConfig(select_top_k=1, threshold=0.0, merge_slots=merge)).remove()


def test_enable_twice_and_non_moe_models_fail():
    model = build_tiny_model("olmoe")
    with sere.hf.enable(model, similarity_for("olmoe"), select_top_k=1, threshold=0.0):
        with pytest.raises(RuntimeError, match="already enabled"):
            sere.hf.enable(model, similarity_for("olmoe"), select_top_k=1, threshold=0.0)
    with pytest.raises(ValueError, match="no MoE router found"):
        sere.hf.enable(torch.nn.Sequential(torch.nn.Linear(4, 4)), {}, select_top_k=1, threshold=0.0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sere.hf.enable("model", {}, select_top_k=1, threshold=0.0)


class _LinearGateBlock(torch.nn.Module):
    """An MoE block whose `gate` is a plain Linear returning logits (older model code)."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(4, E, bias=False)
        self.experts = torch.nn.Identity()

    def forward(self, x):
        return self.gate(x)


def test_router_with_unexpected_output_fails_clearly():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].mlp = _LinearGateBlock()
    sites = sere.hf.find_routers(model)
    assert [(s.layer, s.num_experts) for s in sites] == [(0, E)]
    with sere.hf.enable(model, {0: torch.rand(E, E)}, select_top_k=1, threshold=0.0):
        with pytest.raises(TypeError, match=r"return \(logits, weights, ids\)"):
            model.layers[0].mlp(torch.randn(2, 4))


# ---- the recorder ----------------------------------------------------------------------------


def _stats_row(before, after, rerouted=0, critical=0):
    t = lambda v: torch.tensor(v)  # noqa: E731
    return dict(experts_before=t(before), experts_after=t(after), rerouted=t(rerouted), critical=t(critical))


def test_recorder_lists_rows_per_layer_and_step():
    rec = ExpertStatsRecorder()
    rec.record(1, **_stats_row(8, 3, 5, 1), tokens=4)
    rec.record(0, **_stats_row(7, 2), tokens=4)
    rec.record(1, **_stats_row(6, 6), tokens=2)
    assert rec.layers() == [0, 1]
    assert rec.num_steps(1) == 2
    assert rec.rows() == [
        {"layer": 0, "step": 0, "experts_before": 7, "experts_after": 2, "rerouted": 0, "critical": 0, "tokens": 4},
        {"layer": 1, "step": 0, "experts_before": 8, "experts_after": 3, "rerouted": 5, "critical": 1, "tokens": 4},
        {"layer": 1, "step": 1, "experts_before": 6, "experts_after": 6, "rerouted": 0, "critical": 0, "tokens": 2},
    ]
    s = rec.summary()
    assert s[1]["steps"] == 2 and s[1]["mean_experts_before"] == 7.0 and s[1]["mean_experts_after"] == 4.5
    assert rec.summary(max_tokens=2)[1]["mean_experts_after"] == 6.0
    assert rec.summary(max_tokens=2)[0]["steps"] == 0
    with rec.paused():
        rec.record(0, **_stats_row(1, 1))
    assert rec.num_steps(0) == 1
    rec.reset()
    assert rec.rows() == [] and rec.summary() == {}


def test_recorder_accepts_reroute_stats():
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    sim = torch.rand(E, E) + 0.1
    _, stats = sere.reroute_with_stats(ids, sim, 1, 0.0, backend="torch")
    rec = ExpertStatsRecorder()
    rec.record_stats(3, stats, tokens=ids.shape[0])
    assert rec.rows() == [{"layer": 3, "step": 0, **stats.as_dict(), "tokens": 2}]
    assert set(FIELDS) == {*stats.as_dict(), "tokens"}


@pytest.mark.parametrize("capacity,steps", [(1, 3), (4, 3), (4, 4), (4, 11)])
def test_recorder_ring_keeps_the_last_steps_in_order(capacity, steps):
    rec = ExpertStatsRecorder(capacity=capacity)
    rec.preallocate([0], "cpu")
    buf_before = rec._buf[0]
    for i in range(steps):
        rec.record(0, **_stats_row(100 + i, i), tokens=i)
    entry = rec.per_layer()[0]
    first = max(0, steps - capacity)
    assert entry["step"] == list(range(first, steps))
    assert entry["experts_before"] == [100 + i for i in range(first, steps)]
    assert rec._buf[0] is buf_before  # written in place (what graph replay needs)
    rec.reset()
    assert rec.rows() == [] and rec._buf[0] is buf_before


def test_recorder_rejects_bad_capacity_and_misuse():
    with pytest.raises(ValueError, match="capacity"):
        ExpertStatsRecorder(capacity=0)
    with pytest.raises(ValueError, match="capacity=N"):
        ExpertStatsRecorder().preallocate([0], "cpu")


@pytest.mark.gpu
def test_recorder_ring_records_under_cuda_graph_replay():
    rec = ExpertStatsRecorder(capacity=8)
    rec.preallocate([0], "cuda")
    ids = torch.randint(0, E, (4, K), device="cuda")
    sim = torch.rand(E, E, device="cuda")
    sere.reroute(ids, sim, 1, 0.0, backend="torch")  # warm up (and the one-off NaN check)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        new = sere.reroute(ids, sim, 1, 0.0, backend="torch")
        rec.record_stats(0, sere.stats.reroute_stats(ids, new, E, 1), tokens=4)
    rec.reset()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    entry = rec.per_layer()[0]
    assert entry["step"] == [0, 1, 2] and entry["tokens"] == [4, 4, 4]
