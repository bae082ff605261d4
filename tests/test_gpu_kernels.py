"""GPU parity of the CUDA backends (numba one-launch kernel, torch, research baseline) with the
plain-loop reference at real shapes, in CUDA-graph capture, under torch.compile and on a side stream.

Run: `pytest -m gpu tests/test_gpu_kernels.py` on a machine with a CUDA GPU (skipped elsewhere).
Cases: every (T, E) pair of T in {1, 2, 33, 256, 4096} x E in {8, 60, 64, 128, 256}, with k
rotating over {1, 2, 4, 6, 8} so each k meets every T and every E; inside a case, every S in
0..k with fresh inputs, thresholds 0 / 0.5 / 1 and the id and similarity dtypes rotating with S.
The numba kernel runs through its shape rule and forced onto each of its two paths (one launch;
two launches for large T). Ids compare exactly.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sere
from sere.kernels.reference import reroute_reference
from sere.kernels.vectorized import reroute_torch

pytestmark = pytest.mark.gpu

T_VALUES = (1, 2, 33, 256, 4096)
E_VALUES = (8, 60, 64, 128, 256)
K_VALUES = (1, 2, 4, 6, 8)
CASES = [(T, E, K_VALUES[(i + j) % len(K_VALUES)]) for i, T in enumerate(T_VALUES) for j, E in enumerate(E_VALUES)]
ID_DTYPES = (torch.int32, torch.int64)
SIM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
THRESHOLDS = (0.0, 0.5, 1.0)
# numba: the shape rule picks the path; numba_one / numba_two force the one-launch / two-launch
# (large-T) path, so both are checked at every shape whatever threshold the rule uses;
# numba_two_scatter: the two-launch path with its flags built by the grid scatter (flags_build).
BACKENDS = ("numba", "numba_one", "numba_two", "numba_two_scatter", "torch", "baseline")
# Above this many slots the primary set is drawn small, so the Python reference stays fast.
BIG_SLOTS = 4096


def backend_fn(name):
    if name == "numba":
        from sere.kernels.numba_cuda import reroute_numba

        return reroute_numba
    if name in ("numba_one", "numba_two", "numba_two_scatter"):
        from sere.kernels.numba_cuda import launch_reroute

        def forced(ids, sim, S, rho):
            out = torch.empty_like(ids)  # T, k
            launch_reroute(ids, sim.contiguous(), out, S, rho, two_launch=name != "numba_one",
                           flags_build="scatter" if name == "numba_two_scatter" else "block")
            return out

        return forced
    if name == "baseline":
        from sere.kernels.research_baseline import reroute_research_baseline

        return reroute_research_baseline
    return reroute_torch


def random_case(gen: np.random.Generator, T, E, k, id_dtype, sim_dtype, *, grid: bool):
    """ids [T, k] with -1 and >= E sprinkled in and primary slots from a random subset of experts;
    sim [E, E] either on a grid of quarters (ties) or continuous, rounded to sim_dtype.
    Returns CUDA tensors plus the float32 similarity the reference sees."""
    ids = gen.integers(0, E, size=(T, k))  # T, k
    cap = E if T * k <= BIG_SLOTS else min(E, 16)
    subset = gen.choice(E, size=gen.integers(1, cap + 1), replace=False)
    head = max(1, k // 2)
    ids[:, :head] = gen.choice(subset, size=(T, head))
    invalid = gen.random((T, k)) < 0.1
    ids[invalid] = gen.choice(np.array([-1, -7, E, E + 5]), size=int(invalid.sum()))
    if grid:
        sim32 = (gen.integers(0, 5, size=(E, E)) / 4).astype(np.float32)  # E, E: ties everywhere
    else:
        sim32 = gen.uniform(-0.5, 1.25, size=(E, E)).astype(np.float32)  # E, E
    sim = torch.from_numpy(sim32).to(sim_dtype)  # rounding happens here, once
    ids_t = torch.from_numpy(ids).to(id_dtype)
    return ids_t.cuda(), sim.cuda(), sim.float().numpy()


def expect(ids: torch.Tensor, sim32: np.ndarray, S: int, rho: float) -> torch.Tensor:
    return torch.from_numpy(reroute_reference(ids.cpu().numpy(), sim32, S, rho))


def assert_ids_equal(got: torch.Tensor, want: torch.Tensor, context) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, context
    mismatch = (got.cpu() != want).nonzero()
    assert mismatch.numel() == 0, f"{context}: {mismatch.shape[0]} ids differ, first at {mismatch[0].tolist()}"


@pytest.mark.parametrize("T,E,k", CASES)
def test_backends_match_reference(T, E, k):
    gen = np.random.default_rng([T, E, k])
    fns = {name: backend_fn(name) for name in BACKENDS}
    for S in range(k + 1):
        for r, rho in enumerate(THRESHOLDS):
            id_dtype = ID_DTYPES[(S + r) % 2]
            sim_dtype = SIM_DTYPES[(S + r) % 3]
            ids, sim, sim32 = random_case(gen, T, E, k, id_dtype, sim_dtype, grid=(S + r) % 2 == 0)
            want = expect(ids, sim32, S, rho)
            for name, fn in fns.items():
                assert_ids_equal(fn(ids, sim, S, rho), want, (name, T, E, k, S, rho, id_dtype, sim_dtype))


@pytest.mark.parametrize("E", (512, 1000, 1024))
def test_numba_large_expert_counts(E):
    from sere.kernels.numba_cuda import reroute_numba

    gen = np.random.default_rng(E)
    for S, sim_dtype in ((1, torch.bfloat16), (3, torch.float32)):
        ids, sim, sim32 = random_case(gen, 64, E, 8, torch.int32, sim_dtype, grid=False)
        assert_ids_equal(reroute_numba(ids, sim, S, 0.25), expect(ids, sim32, S, 0.25), (E, S))


def test_numba_rejects_too_many_experts():
    from sere.kernels.numba_cuda import MAX_EXPERTS, reroute_numba

    ids = torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    sim = torch.zeros(MAX_EXPERTS + 1, MAX_EXPERTS + 1, device="cuda")
    with pytest.raises(ValueError, match="at most"):
        reroute_numba(ids, sim, 1, 0.0)


def test_sere_reroute_auto_uses_numba_on_cuda():
    from sere.routing import numba_cuda_usable, resolve_backend

    assert numba_cuda_usable()
    assert resolve_backend("auto", torch.device("cuda")) == "numba"
    gen = np.random.default_rng(1)
    ids, sim, sim32 = random_case(gen, 33, 60, 8, torch.int64, torch.float32, grid=True)
    for backend in ("auto", "numba"):
        new_ids, stats = sere.reroute_with_stats(ids, sim, 2, 0.5, backend=backend)
        assert_ids_equal(new_ids, expect(ids, sim32, 2, 0.5), backend)
        assert stats.experts_after.is_cuda


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype,sim_dtype", [(torch.int32, torch.bfloat16), (torch.int64, torch.float16)])
def test_cuda_graph_replay_with_new_inputs(backend, id_dtype, sim_dtype):
    fn = backend_fn(backend)
    T, E, k, S, rho = 64, 128, 8, 2, 0.5
    gen = np.random.default_rng(5)
    ids, sim, _ = random_case(gen, T, E, k, id_dtype, sim_dtype, grid=True)
    static_ids, static_sim = ids.clone(), sim.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn(static_ids, static_sim, S, rho)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_ids, static_sim, S, rho)
    for round_ in range(3):
        ids, sim, sim32 = random_case(gen, T, E, k, id_dtype, sim_dtype, grid=round_ % 2 == 0)
        static_ids.copy_(ids)
        static_sim.copy_(sim)
        graph.replay()
        torch.cuda.synchronize()
        assert_ids_equal(static_out, expect(ids, sim32, S, rho), (backend, round_))


@pytest.mark.parametrize(
    "entry,id_dtype,sim_dtype",
    [("sere.reroute", torch.int32, torch.float32), ("reroute_numba", torch.int64, torch.bfloat16)],
)
@pytest.mark.parametrize("min_tokens", (None, 1))
def test_torch_compile_fullgraph(entry, id_dtype, sim_dtype, min_tokens, monkeypatch):
    from sere.kernels import numba_launch as nc  # the module whose shape rule reads TWO_LAUNCH_MIN_TOKENS
    from sere.kernels.numba_cuda import reroute_numba

    if min_tokens is not None:  # the shape rule runs inside the op: two launches here
        monkeypatch.setattr(nc, "TWO_LAUNCH_MIN_TOKENS", min_tokens)
    torch._dynamo.reset()

    def route(ids, sim):
        if entry == "sere.reroute":
            out = sere.reroute(ids, sim, 1, 0.25, backend="numba")
        else:
            out = reroute_numba(ids, sim, 1, 0.25)
        return out + 0  # an op after the custom op, so the graph is more than the op

    compiled = torch.compile(route, fullgraph=True)
    gen = np.random.default_rng(9)
    for T in (16, 33):  # a second shape: recompiles or goes dynamic, either must be right
        ids, sim, sim32 = random_case(gen, T, 60, 6, id_dtype, sim_dtype, grid=False)
        assert_ids_equal(compiled(ids, sim), expect(ids, sim32, 1, 0.25), (entry, T))


@pytest.mark.parametrize("min_tokens", (None, 1))
def test_custom_op_and_eager_path_agree(min_tokens, monkeypatch):
    from sere.kernels import numba_launch as nc  # the module whose shape rule reads TWO_LAUNCH_MIN_TOKENS
    from sere.kernels.numba_cuda import reroute_numba

    if min_tokens is not None:  # the op and the eager entry on the two-launch path
        monkeypatch.setattr(nc, "TWO_LAUNCH_MIN_TOKENS", min_tokens)
    gen = np.random.default_rng(11)
    ids, sim, sim32 = random_case(gen, 256, 128, 8, torch.int32, torch.float16, grid=True)
    via_op = torch.ops.sere.reroute(ids, sim, 2, 0.5)
    assert_ids_equal(via_op, expect(ids, sim32, 2, 0.5), "op")
    assert_ids_equal(reroute_numba(ids, sim, 2, 0.5), via_op.cpu(), "eager")
    torch.library.opcheck(torch.ops.sere.reroute.default, (ids, sim, 2, 0.5))


@pytest.mark.parametrize("backend", ("numba", "numba_two", "numba_two_scatter", "baseline"))
def test_runs_on_the_current_non_default_stream(backend):
    """The kernel must run on torch's current stream: its input is produced on a side stream
    behind a ~20 ms sleep, so a launch on any other stream would read stale ids."""
    fn = backend_fn(backend)
    gen = np.random.default_rng(13)
    ids, sim, sim32 = random_case(gen, 256, 64, 8, torch.int64, torch.float32, grid=False)
    stale = torch.full_like(ids, 3)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # cycles: ~10-20 ms
        fresh = stale.copy_(ids)  # ready only after the sleep
        out = fn(fresh, sim, 2, 0.5)
    side.synchronize()
    assert_ids_equal(out, expect(ids, sim32, 2, 0.5), backend)


def test_no_host_sync_and_strided_ids():
    from sere.kernels.numba_cuda import reroute_numba

    gen = np.random.default_rng(17)
    ids, sim, sim32 = random_case(gen, 33, 64, 8, torch.int64, torch.float32, grid=True)
    wide = torch.zeros(33, 16, dtype=ids.dtype, device="cuda")
    wide[:, ::2] = ids
    strided = wide[:, ::2]  # T, k non-contiguous
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = reroute_numba(strided, sim, 3, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_ids_equal(out, expect(ids, sim32, 3, 0.5), "strided")


def test_large_t_two_launch_auto_path():
    """T = 4096, E = 128, k = 8, S = 1 and 2, uniform routing (every expert primary, the case the
    two-launch path exists for) and a few-expert routing, through the shape rule's own choice."""
    from sere.kernels import numba_cuda as nc

    gen = torch.Generator().manual_seed(31)
    sim = torch.rand(128, 128, generator=gen)  # E, E
    uniform = torch.rand(4096, 128, generator=gen).topk(8, dim=-1).indices  # T, k
    narrow = torch.randint(0, 6, (4096, 8), generator=gen)  # T, k: few primary experts
    for ids in (uniform, narrow):
        for S in (1, 2):
            assert nc.use_two_launch(4096, 8, S)
            got = nc.reroute_numba(ids.cuda(), sim.cuda(), S, 0.3)
            assert_ids_equal(got, torch.from_numpy(reroute_reference(ids.numpy(), sim.numpy(), S, 0.3)), S)


def test_zero_tokens():
    from sere.kernels.numba_cuda import reroute_numba

    out = reroute_numba(torch.zeros(0, 8, dtype=torch.int32, device="cuda"), torch.ones(8, 8, device="cuda"), 1, 0.0)
    assert out.shape == (0, 8) and out.dtype == torch.int32


def test_numpy_entry_on_gpu_matches_reference():
    from sere.kernels.numba_cuda import reroute_numba_numpy

    gen = np.random.default_rng(19)
    ids, _, sim32 = random_case(gen, 33, 60, 8, torch.int64, torch.float32, grid=True)
    ids_np = ids.cpu().numpy()
    np.testing.assert_array_equal(reroute_numba_numpy(ids_np, sim32, 2, 0.5), reroute_reference(ids_np, sim32, 2, 0.5))


# ---- the weight-order kernel (routers whose slots are not sorted by weight) -------------------
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_weights(gen: np.random.Generator, T, k, dtype, *, ties: bool) -> torch.Tensor:
    """Router weights in any slot order: on a coarse grid (ties between slots) or continuous."""
    w = gen.integers(1, 6, size=(T, k)) / 8 if ties else gen.random((T, k))
    return torch.from_numpy(w.astype(np.float32)).to(dtype).cuda()


def expect_in_weight_order(ids, weights, sim32, S, rho):
    from sere.kernels.reference import reroute_reference_in_weight_order

    return torch.from_numpy(reroute_reference_in_weight_order(ids.cpu().numpy(), weights.float().cpu().numpy(),
                                                              sim32, S, rho))


@pytest.mark.parametrize("T,E,k", [(1, 8, 4), (2, 60, 4), (33, 64, 6), (256, 128, 8), (4096, 60, 4), (16, 1024, 8)])
def test_weight_order_kernel_matches_reference(T, E, k):
    """Every S, id / weight / similarity dtype rotating, ties in weights and similarity; T = 4096
    takes the large-T path (torch sort, two launches, scatter back)."""
    from sere.kernels.numba_cuda import reroute_numba_in_weight_order

    gen = np.random.default_rng([T, E, k, 3])
    for S in range(k + 1):
        for r, rho in enumerate(THRESHOLDS):
            ids, sim, sim32 = random_case(gen, T, E, k, ID_DTYPES[(S + r) % 2], SIM_DTYPES[(S + r) % 3], grid=r % 2 == 0)
            weights = random_weights(gen, T, k, WEIGHT_DTYPES[(S + 2 * r) % 3], ties=(S + r) % 2 == 0)
            got = reroute_numba_in_weight_order(ids, weights, sim, S, rho)
            assert_ids_equal(got, expect_in_weight_order(ids, weights, sim32, S, rho), (T, E, k, S, rho))


def test_weight_order_kernel_in_graph_replay_and_compiled():
    from sere.kernels.numba_cuda import reroute_numba_in_weight_order

    T, E, k, S, rho = 64, 64, 6, 1, 0.25
    gen = np.random.default_rng(17)
    ids, sim, _ = random_case(gen, T, E, k, torch.int64, torch.float32, grid=False)
    weights = random_weights(gen, T, k, torch.float32, ties=False)
    static = (ids.clone(), weights.clone(), sim.clone())
    reroute_numba_in_weight_order(*static[:2], static[2], S, rho)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = reroute_numba_in_weight_order(*static[:2], static[2], S, rho)
    for round_ in range(3):
        ids, sim, sim32 = random_case(gen, T, E, k, torch.int64, torch.float32, grid=round_ % 2 == 0)
        weights = random_weights(gen, T, k, torch.float32, ties=round_ % 2 == 1)
        for dst, src in zip(static, (ids, weights, sim)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_ids_equal(out, expect_in_weight_order(ids, weights, sim32, S, rho), ("graph", round_))
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, w, s: reroute_numba_in_weight_order(i, w, s, S, rho) + 0, fullgraph=True)
    assert_ids_equal(compiled(ids, weights, sim), expect_in_weight_order(ids, weights, sim32, S, rho), "compiled")
    torch.library.opcheck(torch.ops.sere.reroute_in_weight_order.default, (ids, weights, sim, S, rho))


def test_layer_rerouter_fused_path_equals_the_sorting_path_on_the_gpu():
    """The numba 'sere' transform's in_weight_order through LayerRerouter (an unsorted router, no
    observer) against the same re-router on the torch backend (sort, transform, scatter)."""
    from sere.config import LayerPlan
    from sere.rerouter import LayerRerouter
    from sere.transforms import get_transform

    gen = np.random.default_rng(23)
    ids, sim, _ = random_case(gen, 16, 64, 6, torch.int32, torch.float32, grid=False)
    weights = random_weights(gen, 16, 6, torch.float32, ties=False)
    plan = LayerPlan(0, 1, 0.1, None)
    fused = LayerRerouter(plan, sim, get_transform("sere", backend="numba"), sort_slots=True, backend="numba")
    sorting = LayerRerouter(plan, sim, get_transform("sere", backend="torch"), sort_slots=True, backend="torch")
    assert_ids_equal(fused(ids, weights), sorting(ids, weights).cpu(), "rerouter")


# ---- the merging kernel: re-route, then one slot per expert per token, one launch of one block ---


def expect_merged(ids, weights, sim32, S, rho, in_weight_order):
    from sere.kernels.reference import merge_duplicate_slots_reference

    E = sim32.shape[0]
    new = (expect_in_weight_order(ids, weights, sim32, S, rho) if in_weight_order else expect(ids, sim32, S, rho))
    m_ids, m_w = merge_duplicate_slots_reference(new.numpy(), weights.float().cpu().numpy(), E)
    return torch.from_numpy(m_ids), torch.from_numpy(m_w).to(weights.dtype)


def assert_weights_equal(got, want, context):
    assert got.dtype == want.dtype and got.shape == want.shape, context
    bits = torch.int32 if got.dtype == torch.float32 else torch.int16
    assert torch.equal(got.cpu().view(bits), want.view(bits)), f"{context}: weights differ"


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (4, 128, 8), (3, 60, 4), (2, 64, 6), (33, 64, 6), (256, 128, 8),
                                   (16, 1024, 8), (1, 8, 1)])
@pytest.mark.parametrize("in_weight_order", [False, True], ids=["sorted", "weight-order"])
def test_merging_kernel_matches_reroute_then_merge(T, E, k, in_weight_order):
    """Every S, ids / weights / similarity dtypes rotating: ids and weights bit for bit against the
    reference re-routing followed by the reference merge (one block at every T)."""
    from sere.kernels.numba_cuda import reroute_numba_merged

    gen = np.random.default_rng([T, E, k, 9, int(in_weight_order)])
    for S in range(k + 1):
        for r, rho in enumerate(THRESHOLDS):
            ids, sim, sim32 = random_case(gen, T, E, k, ID_DTYPES[(S + r) % 2], SIM_DTYPES[(S + r) % 3], grid=r % 2 == 0)
            weights = random_weights(gen, T, k, WEIGHT_DTYPES[(S + 2 * r) % 3], ties=(S + r) % 2 == 0)
            if not in_weight_order:
                weights = weights.sort(dim=1, descending=True, stable=True).values
            got_ids, got_w = reroute_numba_merged(ids, weights, sim, S, rho, in_weight_order)
            want_ids, want_w = expect_merged(ids, weights, sim32, S, rho, in_weight_order)
            assert_ids_equal(got_ids, want_ids, (T, E, k, S, rho))
            assert_weights_equal(got_w, want_w, (T, E, k, S, rho))


def test_merging_kernel_in_graph_replay_compiled_and_through_the_rerouter():
    from sere.config import LayerPlan
    from sere.kernels.numba_cuda import reroute_numba_merged
    from sere.rerouter import LayerRerouter
    from sere.transforms import get_transform

    T, E, k, S, rho = 4, 128, 8, 1, 0.0
    gen = np.random.default_rng(29)
    ids, sim, _ = random_case(gen, T, E, k, torch.int32, torch.bfloat16, grid=False)
    weights = random_weights(gen, T, k, torch.float32, ties=False).sort(dim=1, descending=True).values
    static = (ids.clone(), weights.clone(), sim.clone())
    reroute_numba_merged(*static, S, rho)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_ids, out_w = reroute_numba_merged(*static, S, rho)
    for round_ in range(3):
        ids, sim, sim32 = random_case(gen, T, E, k, torch.int32, torch.bfloat16, grid=round_ % 2 == 0)
        weights = random_weights(gen, T, k, torch.float32, ties=False).sort(dim=1, descending=True).values
        for dst, src in zip(static, (ids, weights, sim)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want_ids, want_w = expect_merged(ids, weights, sim32, S, rho, False)
        assert_ids_equal(out_ids, want_ids, ("graph", round_))
        assert_weights_equal(out_w, want_w, ("graph", round_))
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, w, s: reroute_numba_merged(i, w, s, S, rho), fullgraph=True)
    got_ids, got_w = compiled(ids, weights, sim)
    assert_ids_equal(got_ids, want_ids, "compiled")
    torch.library.opcheck(torch.ops.sere.reroute_merged.default, (ids, weights, sim, S, rho, False))
    plan = LayerPlan(0, S, rho, None)
    on_numba = LayerRerouter(plan, sim.float(), get_transform("sere", backend="numba"), sort_slots=False,
                             backend="numba", merge_tokens=4)
    on_torch = LayerRerouter(plan, sim.float(), get_transform("sere", backend="torch"), sort_slots=False,
                             backend="torch", merge_tokens=4)
    (w_n, i_n), (w_t, i_t) = on_numba.route_merged(ids, weights), on_torch.route_merged(ids, weights)
    assert_ids_equal(i_n, i_t.cpu(), "rerouter")
    assert_weights_equal(w_n, w_t.cpu(), "rerouter")
    assert bool((i_n == -1).any())  # S = 1, rho = 0 at T = 4 of E = 128: slots pile up


# ---- the fused router top-k + re-route kernel ---------------------------------------------------


@pytest.mark.parametrize("T", [2, 9, 64])
def test_fused_topk_reroute_every_chunk_size(T):
    """Every chunk a block of 8 groups can take (the launch rule picks one per T; the bench times
    them all), each the reference's ids."""
    from sere.kernels.numba_cuda import topk_reroute_numba
    from sere.kernels.reference import topk_reroute_reference

    gen = np.random.default_rng([T, 17])
    logits = torch.from_numpy(gen.standard_normal((T, 128)).astype(np.float32)).bfloat16().cuda()
    _, sim, sim32 = random_case(gen, 1, 128, 8, torch.int32, torch.float32, grid=True)
    _, want = topk_reroute_reference(logits.float().cpu().numpy(), 8, True, sim32, 1, 0.1)
    for chunk in range(1, 9):
        _, ids = topk_reroute_numba(logits, sim, 8, True, 1, 0.1, chunk_tokens=chunk)
        assert_ids_equal(ids.long(), torch.from_numpy(want), (T, chunk))


@pytest.mark.parametrize("T,E,k", [(1, 60, 4), (16, 64, 6), (64, 128, 8), (256, 128, 8), (33, 256, 8), (8, 1024, 8)])
def test_fused_topk_reroute_matches_reference(T, E, k):
    from sere.kernels.numba_cuda import topk_reroute_numba
    from sere.kernels.reference import topk_reroute_reference

    gen = np.random.default_rng([T, E, k, 13])
    for S in range(k + 1):
        for r, logit_dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
            logits = torch.from_numpy(gen.standard_normal((T, E)).astype(np.float32)).to(logit_dtype).cuda()
            _, sim, sim32 = random_case(gen, 1, E, k, torch.int32, SIM_DTYPES[(S + r) % 3], grid=r == 1)
            renormalize, rho = (S + r) % 2 == 0, THRESHOLDS[(S + r) % 3]
            w, ids = topk_reroute_numba(logits, sim, k, renormalize, S, rho, ids_dtype=ID_DTYPES[r % 2])
            rw, rids = topk_reroute_reference(logits.float().cpu().numpy(), k, renormalize, sim32, S, rho)
            assert ids.dtype == ID_DTYPES[r % 2] and w.dtype == torch.float32
            assert_ids_equal(ids.long(), torch.from_numpy(rids), (T, E, k, S, logit_dtype))
            np.testing.assert_allclose(w.cpu().numpy(), rw, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (4, 128, 8), (3, 60, 4), (2, 64, 6), (8, 128, 8)])
def test_fused_topk_merging_matches_reference(T, E, k):
    """The merging variant (one block): ids bit for bit, weights to float rounding, against the
    reference top-k + re-route followed by the reference merge."""
    from sere.kernels.numba_cuda import topk_reroute_numba
    from sere.kernels.reference import merge_duplicate_slots_reference, topk_reroute_reference

    gen = np.random.default_rng([T, E, k, 23])
    for S in range(k + 1):
        for r, logit_dtype in enumerate((torch.float32, torch.bfloat16)):
            logits = torch.from_numpy(gen.standard_normal((T, E)).astype(np.float32)).to(logit_dtype).cuda()
            _, sim, sim32 = random_case(gen, 1, E, k, torch.int32, SIM_DTYPES[(S + r) % 3], grid=r == 1)
            renormalize, rho = (S + r) % 2 == 0, THRESHOLDS[(S + r) % 3]
            w, ids = topk_reroute_numba(logits, sim, k, renormalize, S, rho, ids_dtype=ID_DTYPES[r % 2], merge=True)
            rw, rids = topk_reroute_reference(logits.float().cpu().numpy(), k, renormalize, sim32, S, rho)
            mids, mw = merge_duplicate_slots_reference(rids, rw.astype(np.float32), E)
            assert_ids_equal(ids.long(), torch.from_numpy(mids), (T, E, k, S, logit_dtype))
            np.testing.assert_allclose(w.cpu().numpy(), mw, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one block"):
        topk_reroute_numba(torch.zeros(9, E, device="cuda"), sim, k, True, 1, 0.0, merge=True)


def test_fused_topk_reroute_in_graph_replay_compiled_and_as_op():
    from sere.kernels.numba_cuda import topk_reroute_numba
    from sere.kernels.reference import topk_reroute_reference

    T, E, k, S, rho = 16, 128, 8, 1, 0.0
    gen = np.random.default_rng(31)
    logits = torch.from_numpy(gen.standard_normal((T, E)).astype(np.float32)).cuda()
    _, sim, _ = random_case(gen, 1, E, k, torch.int32, torch.float32, grid=False)
    static_logits, static_sim = logits.clone(), sim.clone()
    topk_reroute_numba(static_logits, static_sim, k, True, S, rho)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = topk_reroute_numba(static_logits, static_sim, k, True, S, rho)
    for round_ in range(3):
        logits = torch.from_numpy(gen.standard_normal((T, E)).astype(np.float32)).cuda()
        _, sim, sim32 = random_case(gen, 1, E, k, torch.int32, torch.float32, grid=round_ % 2 == 0)
        static_logits.copy_(logits)
        static_sim.copy_(sim)
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = topk_reroute_reference(logits.cpu().numpy(), k, True, sim32, S, rho)
        assert_ids_equal(ids.long(), torch.from_numpy(rids), ("graph", round_))
        np.testing.assert_allclose(w.cpu().numpy(), rw, rtol=2e-6, atol=1e-7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s: topk_reroute_numba(x, s, k, True, S, rho)[1] + 0, fullgraph=True)
    assert_ids_equal(compiled(logits, sim).long(), torch.from_numpy(rids), "compiled")
    torch.library.opcheck(torch.ops.sere.topk_reroute.default, (logits, sim, k, True, S, rho, False))
