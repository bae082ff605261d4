"""Kernel bench: the SERE re-routing backends at decode and prefill sizes (pytest-benchmark).

Run:  pytest bench/test_bench_reroute.py                         (CPU cases; GPU cases need CUDA)
      pytest bench/test_bench_reroute.py --benchmark-json=out.json (keeps extra_info: ratios etc.)
      pytest bench/test_bench_reroute.py --benchmark-disable       (smoke: validate, run once)
Cases: T in {1, 16, 64, 256, 4096}, E = 128, k = 8, S in {1, 2}, rho = 0.1, int64 ids, float32
similarity (uniform in [0, 1)). CPU: reference, torch. CUDA: torch, numba (the one-launch kernel),
baseline (research structure, three launches: mask clear, scatter, a thread per slot scanning
all E), each timed
by CUDA-graph replay ("graph": the per-call device time decode sees under CUDA graphs) and by
events around eager calls ("events": host launch overhead included when it dominates).
Routing: "uniform" (each token takes k distinct experts uniformly at random: the most experts
active, the hardest case for SERE) and "zipf" (expert popularity ~ 1/rank, a skew closer to
trained routers). Every case first checks its output against the plain-loop reference.
numba cases also time torch and baseline in the same run and record the ratios in extra_info;
under graph replay also the one-launch floor (an empty kernel, an ids copy, and a copy through
each slot's similarity row; same launch path and grid: bench/launch_floor.py).
Fused router top-k (test_gpu_fused_topk): softmax top-k and re-routing in one kernel
(sere.kernels.numba_topk), bf16 logits, against the two-launch path it replaces (stock's top-k,
then the reroute kernel) and against stock's top-k alone; stock's top-k is vLLM's one-kernel
topk_softmax where vLLM's CUDA build is importable, else torch's softmax + topk + renormalise
(several launches: a weaker stock, named in extra_info "stock_topk"), graph replay, E = 128, k = 8.
Unsorted routers (test_gpu_unsorted: slots shuffled, weights given, as vLLM's grouped top-k
returns them): the weight-order kernel (one launch) against the path it replaces (argsort,
gather, the kernel, scatter back), graph replay, ratio in extra_info.
Merged slots (test_gpu_merged, T = 1 / 4 / 16): the kernel that re-routes and merges each token's
duplicate slots in one block, against the plain kernel and the plain kernel + torch merge.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.timing import benchmark_device, time_events, time_graph_replay
from sere.kernels.reference import reroute_reference
from sere.kernels.vectorized import reroute_torch
from sere.stats import reroute_stats

T_VALUES = (1, 16, 64, 256, 4096)
E, K, RHO = 128, 8, 0.1
S_VALUES = (1, 2)
ROUTINGS = ("uniform", "zipf")
GPU_BACKENDS = ("torch", "numba", "baseline")
METHODS = ("graph", "events")
CALLS = 100  # calls per graph / per timed round
ROUNDS = 20

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(T: int, routing: str, device: str, seed: int = 0):
    """topk_ids [T, k] int64 (slot 0 = first choice) and sim [E, E] float32."""
    gen = torch.Generator().manual_seed(seed)
    if routing == "uniform":
        ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices  # T, k
    elif routing == "zipf":
        popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)  # E
        popularity = popularity[torch.randperm(E, generator=gen)]
        ids = torch.multinomial(popularity.expand(T, E), K, replacement=False, generator=gen)  # T, k
    else:
        raise ValueError(f"unknown routing {routing!r}")
    sim = torch.rand(E, E, generator=gen)  # E, E
    return ids.to(device), sim.to(device)


def gpu_backend(name: str):
    if name == "torch":
        return reroute_torch
    if name == "numba":
        from sere.kernels.numba_cuda import reroute_numba

        return reroute_numba
    if name == "baseline":
        from sere.kernels.research_baseline import reroute_research_baseline

        return reroute_research_baseline
    raise ValueError(name)


def check_against_reference(out: torch.Tensor, ids: torch.Tensor, sim: torch.Tensor, S: int) -> None:
    want = reroute_reference(ids.cpu().numpy(), sim.float().cpu().numpy(), S, RHO)
    np.testing.assert_array_equal(out.cpu().numpy(), want)


def record_case(benchmark, *, T, S, routing, backend, method, ids, new_ids, timing) -> None:
    stats = reroute_stats(ids, new_ids, E, S).as_dict()
    benchmark.extra_info.update(
        T=T, E=E, k=K, S=S, rho=RHO, backend=backend, routing=routing, method=method,
        experts_before=stats["experts_before"], experts_after=stats["experts_after"],
        device=torch.cuda.get_device_name() if ids.is_cuda else "cpu",
    )
    if timing is not None:
        benchmark.extra_info["us_per_call"] = round(timing.median_us, 3)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("S", S_VALUES)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_cpu(benchmark, backend, T, S, routing):
    ids, sim = make_inputs(T, routing, "cpu")
    if backend == "reference":
        ids_np, sim_np = ids.numpy(), sim.numpy()
        fn = lambda: reroute_reference(ids_np, sim_np, S, RHO)  # noqa: E731
        new_ids = torch.from_numpy(fn())
        calls = 1 if T >= 256 else 10
    else:
        fn = lambda: reroute_torch(ids, sim, S, RHO)  # noqa: E731
        new_ids = fn()
        calls = 10
    check_against_reference(new_ids, ids, sim, S)
    timing = benchmark_device(benchmark, fn, method="host", calls=calls, rounds=5)
    record_case(benchmark, T=T, S=S, routing=routing, backend=backend, method="host", ids=ids,
                new_ids=new_ids, timing=timing)


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("S", S_VALUES)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu(benchmark, backend, T, S, routing, method):
    ids, sim = make_inputs(T, routing, "cuda")
    reroute = gpu_backend(backend)
    fn = lambda: reroute(ids, sim, S, RHO)  # noqa: E731
    new_ids = fn()
    check_against_reference(new_ids, ids, sim, S)
    timing = benchmark_device(benchmark, fn, method=method, calls=CALLS, rounds=ROUNDS)
    record_case(benchmark, T=T, S=S, routing=routing, backend=backend, method=method, ids=ids,
                new_ids=new_ids, timing=timing)
    if backend == "numba" and timing is not None:
        # Ratios inside one run, on the same inputs and with the same timing method.
        measure = time_graph_replay if method == "graph" else time_events
        for other in ("baseline", "torch"):
            other_fn = gpu_backend(other)
            t_other = measure(lambda: other_fn(ids, sim, S, RHO), calls=CALLS, repeats=ROUNDS)
            benchmark.extra_info[f"{other}_us_per_call"] = round(t_other.median_us, 3)
            benchmark.extra_info[f"speedup_vs_{other}"] = round(t_other.median_us / timing.median_us, 2)
        print(
            f"\n[reroute T={T} S={S} {routing} {method}] numba {timing.median_us:.2f} us, "
            f"baseline {benchmark.extra_info['baseline_us_per_call']:.2f} us "
            f"({benchmark.extra_info['speedup_vs_baseline']:.2f}x), "
            f"torch {benchmark.extra_info['torch_us_per_call']:.2f} us "
            f"({benchmark.extra_info['speedup_vs_torch']:.2f}x)"
        )
    if backend == "numba" and method == "graph" and timing is not None:
        record_launch_floor(benchmark, ids, sim, S)


def record_launch_floor(benchmark, ids: torch.Tensor, sim: torch.Tensor, S: int) -> None:
    """The one-launch floor beside the plain kernel: an empty kernel, an ids-to-out copy and a copy
    through each slot's similarity row on the same launch path and grid, graph replay
    (bench/launch_floor.py)."""
    from bench.launch_floor import FLOORS, floor_launcher

    for name in FLOORS:
        out = torch.zeros_like(ids)
        launch = floor_launcher(name, ids, sim, out, S)
        launch()
        if name != "empty":
            assert torch.equal(out, ids), f"the {name} floor kernel did not copy the ids"
        t = time_graph_replay(launch, calls=CALLS, repeats=ROUNDS)
        benchmark.extra_info[f"{name}_launch_us_per_call"] = round(t.median_us, 3)
    print("  one-launch floor: " + ", ".join(f"{name} {benchmark.extra_info[f'{name}_launch_us_per_call']:.2f} us"
                                             for name in FLOORS))


def unsorted_inputs(T: int, device: str, seed: int = 0):
    """ids [T, k] in shuffled slot order with their weights [T, k] (float32, distinct per token)."""
    ids, sim = make_inputs(T, "uniform", device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(T, K, generator=gen).sort(dim=1, descending=True).values  # T, k: slot 0 heaviest
    perm = torch.stack([torch.randperm(K, generator=gen) for _ in range(T)])  # T, k
    return ids.gather(1, perm.to(device)), weights.gather(1, perm).to(device), sim


@needs_cuda
@pytest.mark.parametrize("S", S_VALUES)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("backend", ("numba_weight_order", "sort_numba_scatter"))
def test_gpu_unsorted(benchmark, backend, T, S):
    from sere.kernels.numba_cuda import reroute_numba, reroute_numba_in_weight_order
    from sere.kernels.reference import reroute_reference_in_weight_order
    from sere.rerouter import reroute_in_weight_order

    ids, weights, sim = unsorted_inputs(T, "cuda")
    fused = lambda: reroute_numba_in_weight_order(ids, weights, sim, S, RHO)  # noqa: E731
    sorting = lambda: reroute_in_weight_order(ids, weights, lambda x: reroute_numba(x, sim, S, RHO))[0]  # noqa: E731
    fn = fused if backend == "numba_weight_order" else sorting
    new_ids = fn()
    want = reroute_reference_in_weight_order(ids.cpu().numpy(), weights.cpu().numpy(), sim.cpu().numpy(), S, RHO)
    np.testing.assert_array_equal(new_ids.cpu().numpy(), want)
    timing = benchmark_device(benchmark, fn, method="graph", calls=CALLS, rounds=ROUNDS)
    record_case(benchmark, T=T, S=S, routing="uniform-unsorted", backend=backend, method="graph", ids=ids,
                new_ids=new_ids, timing=timing)
    if backend == "numba_weight_order" and timing is not None:
        t_sort = time_graph_replay(sorting, calls=CALLS, repeats=ROUNDS)
        benchmark.extra_info["sort_path_us_per_call"] = round(t_sort.median_us, 3)
        benchmark.extra_info["speedup_vs_sort_path"] = round(t_sort.median_us / timing.median_us, 2)
        print(f"\n[unsorted T={T} S={S}] weight-order kernel {timing.median_us:.2f} us, "
              f"sort path {t_sort.median_us:.2f} us ({t_sort.median_us / timing.median_us:.2f}x)")


@needs_cuda
@pytest.mark.parametrize("S", S_VALUES)
@pytest.mark.parametrize("T", (1, 4, 16))
def test_gpu_merged(benchmark, T, S):
    """The merging kernel (re-route, then one slot per expert per token, one block) at vLLM's
    small-batch sizes (T k 4 <= E is T <= 4 here; 16 shows the one block's cost past them), against
    the plain kernel alone and the plain kernel followed by the torch merge."""
    from sere.kernels.numba_cuda import reroute_numba, reroute_numba_merged
    from sere.kernels.reference import merge_duplicate_slots_reference
    from sere.routing import merge_duplicate_slots

    ids, sim = make_inputs(T, "uniform", "cuda")
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(T)).sort(dim=1, descending=True).values.cuda()
    merged = lambda: reroute_numba_merged(ids, weights, sim, S, RHO)  # noqa: E731
    new_ids, new_w = merged()
    want_ids, want_w = merge_duplicate_slots_reference(
        reroute_reference(ids.cpu().numpy(), sim.cpu().numpy(), S, RHO), weights.cpu().numpy(), E)
    np.testing.assert_array_equal(new_ids.cpu().numpy(), want_ids)
    np.testing.assert_array_equal(new_w.cpu().numpy(), want_w)
    timing = benchmark_device(benchmark, merged, method="graph", calls=CALLS, rounds=ROUNDS)
    record_case(benchmark, T=T, S=S, routing="uniform-merged", backend="numba_merged", method="graph", ids=ids,
                new_ids=new_ids, timing=timing)
    benchmark.extra_info["merged_slots"] = int((new_ids == -1).sum())
    if timing is not None:
        plain = lambda: reroute_numba(ids, sim, S, RHO)  # noqa: E731
        torch_merge = lambda: merge_duplicate_slots(plain(), weights, E)  # noqa: E731
        for name, fn in (("plain_kernel", plain), ("plain_then_torch_merge", torch_merge)):
            benchmark.extra_info[f"{name}_us_per_call"] = round(time_graph_replay(fn, calls=CALLS, repeats=ROUNDS).median_us, 3)
        print(f"\n[merged T={T} S={S}] merging kernel {timing.median_us:.2f} us, plain kernel "
              f"{benchmark.extra_info['plain_kernel_us_per_call']:.2f} us, plain + torch merge "
              f"{benchmark.extra_info['plain_then_torch_merge_us_per_call']:.2f} us")


def vllm_topk():
    """vLLM's one-kernel softmax top-k (topk_softmax, what its FusedTopKRouter runs), or None
    without vLLM's CUDA build."""
    try:
        from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk
    except Exception:  # no vLLM, or one without CUDA ops
        return None
    return fused_topk


def torch_topk(logits):
    """Softmax, top-k, renormalise in torch (several launches): (weights float32, ids int32)."""
    w, ids = torch.softmax(logits.float(), dim=-1).topk(K, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def stock_topk_of(logits):
    """(the stock router's top-k on these logits as a no-argument call, its name): vLLM's
    topk_softmax where vLLM's CUDA build is importable, else torch's."""
    vllm_fused = vllm_topk()
    if vllm_fused is None:
        return (lambda: torch_topk(logits)), "torch softmax+topk"
    hidden = torch.empty(logits.shape[0], 1, device=logits.device)
    return (lambda: vllm_fused(hidden, logits, K, True)[:2]), "vllm topk_softmax"


@needs_cuda
@pytest.mark.parametrize("S", S_VALUES)
@pytest.mark.parametrize("T", (1, 8, 16, 64, 256))  # 8: the most tokens one block of 256 threads holds
def test_gpu_fused_topk(benchmark, T, S):
    from sere.kernels.numba_cuda import reroute_numba, topk_reroute_numba
    from sere.kernels.reference import topk_reroute_reference

    gen = torch.Generator().manual_seed(T)
    logits = torch.randn(T, E, generator=gen).cuda().bfloat16()  # the routers' dtype in vLLM's bf16 models
    _, sim = make_inputs(T, "uniform", "cuda")
    ids_dtype = torch.int32  # vLLM's top-k ids
    stock_topk, stock_name = stock_topk_of(logits)

    def two_launch_path():  # what SERE runs without the fused kernel: stock's top-k, then the re-route kernel
        w, ids = stock_topk()
        return w, reroute_numba(ids, sim, S, RHO)

    fused = lambda: topk_reroute_numba(logits, sim, K, True, S, RHO, ids_dtype=ids_dtype)  # noqa: E731
    w, ids = fused()
    rw, rids = topk_reroute_reference(logits.float().cpu().numpy(), K, True, sim.cpu().numpy(), S, RHO)
    np.testing.assert_array_equal(ids.long().cpu().numpy(), rids)
    timing = benchmark_device(benchmark, fused, method="graph", calls=CALLS, rounds=ROUNDS)
    record_case(benchmark, T=T, S=S, routing="router-logits", backend="numba_fused_topk", method="graph",
                ids=torch_topk(logits)[1].long(), new_ids=ids.long(), timing=timing)
    benchmark.extra_info["stock_topk"] = stock_name
    if timing is not None:
        chunks = {f"chunk{c}": (lambda c=c: topk_reroute_numba(logits, sim, K, True, S, RHO, ids_dtype=ids_dtype,
                                                               chunk_tokens=c)) for c in (1, 2, 4, 8)}
        for name, fn in (("topk_then_reroute", two_launch_path), ("stock_topk", stock_topk), *chunks.items()):
            t = time_graph_replay(fn, calls=CALLS, repeats=ROUNDS)
            benchmark.extra_info[f"{name}_us_per_call"] = round(t.median_us, 3)
        benchmark.extra_info["added_over_stock_topk_us"] = round(
            timing.median_us - benchmark.extra_info["stock_topk_us_per_call"], 3)


@needs_cuda
@pytest.mark.parametrize("S", S_VALUES)
@pytest.mark.parametrize("T", (1, 4))  # vLLM's small-batch path here (T k 4 <= E), where merging is on
def test_gpu_fused_topk_merged(benchmark, T, S):
    """The fused kernel's merging variant (top-k, re-route and merge in one block) against what SERE
    runs at these sizes by default: stock's top-k, then the merging re-route kernel."""
    from sere.kernels.numba_cuda import reroute_numba_merged, topk_reroute_numba
    from sere.kernels.reference import merge_duplicate_slots_reference, topk_reroute_reference

    gen = torch.Generator().manual_seed(T)
    logits = torch.randn(T, E, generator=gen).cuda().bfloat16()
    _, sim = make_inputs(T, "uniform", "cuda")
    stock_topk, stock_name = stock_topk_of(logits)

    def topk_then_merged():  # SERE's default at these sizes: two launches after the router's logits
        w, ids = stock_topk()
        return reroute_numba_merged(ids, w.float(), sim, S, RHO)

    fused = lambda: topk_reroute_numba(logits, sim, K, True, S, RHO, merge=True)  # noqa: E731
    w, ids = fused()
    rw, rids = topk_reroute_reference(logits.float().cpu().numpy(), K, True, sim.cpu().numpy(), S, RHO)
    want_ids, _ = merge_duplicate_slots_reference(rids, rw.astype(np.float32), E)
    np.testing.assert_array_equal(ids.long().cpu().numpy(), want_ids)
    timing = benchmark_device(benchmark, fused, method="graph", calls=CALLS, rounds=ROUNDS)
    record_case(benchmark, T=T, S=S, routing="router-logits", backend="numba_fused_topk_merged", method="graph",
                ids=torch.from_numpy(rids).to(ids.device), new_ids=ids.long(), timing=timing)
    benchmark.extra_info["merged_slots"] = int((ids == -1).sum())
    benchmark.extra_info["stock_topk"] = stock_name
    if timing is not None:
        t = time_graph_replay(topk_then_merged, calls=CALLS, repeats=ROUNDS)
        benchmark.extra_info["topk_then_merged_us_per_call"] = round(t.median_us, 3)
