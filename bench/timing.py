"""How long bench work takes, measured one way in every bench and device script.

    from bench.timing import benchmark_device, time_graph_replay

- `time_graph_replay(fn)`: capture `calls` calls of fn in one CUDA graph, replay it, CUDA events
  around each replay, median over repeats, divided by `calls`: the per-call device time with the
  launch gaps that CUDA graphs leave (how vLLM runs decode). fn must be graph-safe.
- `time_events(fn)`: the same with eager calls between two events: per-call time of eager code,
  host launch overhead included whenever the host, not the GPU, is the bottleneck.
- `time_host(fn)`: perf_counter around calls, for CPU code.
- `seconds_of_one_call(fn)`: one call, no warm-up (CUDA events on a GPU, else the host clock),
  for work too slow to repeat.
- `benchmark_device(benchmark, fn, method=...)`: a pytest-benchmark adapter. It swaps the
  fixture's timer for a clock that advances by the measured device time of each round, so the
  fixture's statistics (min/median/mean, --benchmark-compare, saved JSON) are per-call DEVICE
  seconds, not host time around asynchronous work. Without CUDA it times on the host.
- `benchmark_samples(benchmark, seconds, what=...)`: the same clock fed with times measured
  elsewhere (the end-to-end bench times decode steps inside vLLM engine subprocesses).
- `measure_copy_bandwidth(device)`: the copy bandwidth every weight-streaming case is measured
  against (the HBM floor, bench/extra_info.py).
- `Deadline`: the time budget of a device run (cases or engines left when it runs out are skipped).
Inputs stay where they are between calls: for a routing kernel that reads what the router just
wrote, a warm L2 is the realistic case (flush the cache in fn for cold-cache numbers).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

METHODS = ("graph", "events", "host")


@dataclass(frozen=True)
class Timing:
    """Per-call times in seconds, one per repeat (each repeat averages `calls` calls)."""

    method: str
    calls: int
    per_call_s: list[float] = field(repr=False)

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_call_s) * 1e6

    @property
    def min_us(self) -> float:
        return min(self.per_call_s) * 1e6

    def as_dict(self) -> dict:
        return {"method": self.method, "calls_per_repeat": self.calls, "repeats": len(self.per_call_s),
                "median_us": round(self.median_us, 3), "min_us": round(self.min_us, 3)}


class GraphReplayer:
    """`calls` calls of fn captured in one CUDA graph; `run()` replays it once and returns the
    per-call device seconds (events around the replay)."""

    def __init__(self, fn, calls: int = 100, warmup: int = 3):
        self.calls = calls
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, allocator pools) off the capture
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(calls):
                fn()
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        for _ in range(warmup):
            self.graph.replay()
        torch.cuda.synchronize()

    def run(self) -> float:
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3 / self.calls


class EventRunner:
    """`calls` eager calls of fn between two CUDA events; `run()` returns per-call seconds."""

    def __init__(self, fn, calls: int = 100, warmup: int = 3):
        self.fn, self.calls = fn, calls
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def run(self) -> float:
        fn = self.fn
        self.start.record()
        for _ in range(self.calls):
            fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3 / self.calls


class HostRunner:
    """`calls` calls of fn between two perf_counter reads (CPU code; syncs CUDA at the end)."""

    def __init__(self, fn, calls: int = 10, warmup: int = 1):
        self.fn, self.calls = fn, calls
        for _ in range(warmup):
            fn()

    def run(self) -> float:
        fn = self.fn
        t0 = time.perf_counter()
        for _ in range(self.calls):
            fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / self.calls


_RUNNERS = {"graph": GraphReplayer, "events": EventRunner, "host": HostRunner}


def make_runner(fn, method: str, calls: int, warmup: int = 3):
    if method not in _RUNNERS:
        raise ValueError(f"unknown timing method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "host" and not torch.cuda.is_available():
        raise RuntimeError(f"timing method {method!r} needs CUDA; use 'host' on the CPU")
    return _RUNNERS[method](fn, calls, warmup)


def _measure(fn, method: str, calls: int, repeats: int, warmup: int) -> Timing:
    runner = make_runner(fn, method, calls, warmup)
    return Timing(method, calls, [runner.run() for _ in range(repeats)])


def time_graph_replay(fn, *, calls: int = 100, repeats: int = 20, warmup: int = 3) -> Timing:
    """Median per-call device time of fn from CUDA-graph replay (see the module docstring)."""
    return _measure(fn, "graph", calls, repeats, warmup)


def time_events(fn, *, calls: int = 100, repeats: int = 20, warmup: int = 3) -> Timing:
    """Median per-call time of eager fn between CUDA events (host overhead shows if it dominates)."""
    return _measure(fn, "events", calls, repeats, warmup)


def time_host(fn, *, calls: int = 10, repeats: int = 5, warmup: int = 1) -> Timing:
    """Median per-call wall time of fn on the host (CPU code)."""
    return _measure(fn, "host", calls, repeats, warmup)


def seconds_of_one_call(fn) -> float:
    """Seconds of one call of fn, no warm-up: CUDA events where CUDA is present (pending work
    finished first), else the host clock."""
    return make_runner(fn, "events" if torch.cuda.is_available() else "host", calls=1, warmup=0).run()


def measure_copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Copy bandwidth of `device` in bytes/s, read + write counted (a copy of N bytes moves 2N):
    the fastest of a few copies of 1 GiB (GPU, CUDA events) or 64 MiB (CPU, host clock)."""
    nbytes = nbytes or (2**30 if device == "cuda" else 2**26)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = time_events if device == "cuda" else time_host
    timing = timer(lambda: dst.copy_(src), calls=1, repeats=5, warmup=1)
    return 2 * nbytes / (timing.min_us * 1e-6)


class Deadline:
    """A time budget of `seconds` (None: no limit) from `start()`: `refuses()` once fewer than
    `min_left` seconds are left (what would start then could not finish), `cap(timeout)` bounds
    one step's timeout by what is left."""

    def __init__(self, seconds: float | None, *, min_left: float = 0.0, start: bool = True):
        self.seconds, self.min_left = seconds, min_left
        self.started = time.perf_counter() if start else None

    def start(self) -> None:
        """Start the clock, if it is not running yet."""
        if self.started is None:
            self.started = time.perf_counter()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def refuses(self) -> bool:
        return self.left() < self.min_left

    def cap(self, timeout: float) -> float:
        return min(timeout, max(self.left(), 1.0))  # a step gets a second at least


class DeviceClock:
    """A fake timer for pytest-benchmark: reads as the sum of the device times measured so far,
    so `end - start` around one round is that round's measured per-call device time."""

    __name__ = "sere_device_clock"

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _feed_rounds(benchmark, measure, rounds: int, warmup_rounds: int) -> list[float]:
    """pytest-benchmark's rounds on a DeviceClock: each round advances it by the seconds
    `measure()` returns, so the fixture's statistics are those seconds. Returns them, warm-up
    rounds left out."""
    clock = DeviceClock()
    samples: list[float] = []

    def one_round():
        dt = measure()
        samples.append(dt)
        clock.now += dt

    benchmark._timer = clock  # pytest-benchmark reads its timer from this attribute
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return samples[warmup_rounds:]


def benchmark_samples(benchmark, samples: list[float], *, what: str) -> None:
    """Hand times measured elsewhere (seconds, one per round; e.g. decode steps timed inside a
    vLLM engine subprocess) to pytest-benchmark, so that they are saved and compared like any
    other case. `what` says how they were measured (extra_info["timing"])."""
    if not samples:
        raise ValueError("benchmark_samples: no samples")
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(lambda: None, rounds=1)
        return
    _feed_rounds(benchmark, iter(samples).__next__, len(samples), warmup_rounds=0)
    benchmark.extra_info["timing"] = what


def benchmark_device(benchmark, fn, *, method: str = "graph", calls: int = 100, rounds: int = 20,
                     warmup: int = 3) -> Timing | None:
    """Time fn with pytest-benchmark's fixture, reporting per-call device time on CUDA (method
    'graph' or 'events') and plain host time otherwise. Returns the Timing (None when the
    fixture is disabled, e.g. --benchmark-disable: then fn runs once as a smoke test)."""
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=1)
        return None
    if method != "host" and not torch.cuda.is_available():
        method = "host"
    if method == "host":
        # Plain pytest-benchmark timing: `calls` calls per round, host clock.
        benchmark.pedantic(fn, rounds=rounds, iterations=calls, warmup_rounds=1)
        per_call = [t for t in benchmark.stats.stats.data]
        timing = Timing("host", calls, per_call)
    else:
        runner = make_runner(fn, method, calls, warmup)
        timing = Timing(method, calls, _feed_rounds(benchmark, runner.run, rounds, warmup_rounds=1))
    benchmark.extra_info["timing"] = (
        f"{method}: per-call {'device' if method != 'host' else 'host'} time, "
        f"{calls} calls per round, {rounds} rounds"
    )
    return timing
