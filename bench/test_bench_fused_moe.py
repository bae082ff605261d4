"""Benchmark of one MoE layer on vLLM's fused MoE kernel (Triton `fused_experts`), stock vs SERE.

    pytest bench/test_bench_fused_moe.py                   # CUDA + vLLM: real shapes, graph replay
    pytest bench/test_bench_fused_moe.py -k "Qwen3 and uniform"
    SERE_BENCH_ROUTING=uniform,zipf:1.2    routings to run (bench/routing.py; default both)

The layer of bench/fused_layer.py (router + vLLM `fused_topk`, the one-launch Numba
re-routing kernel, vLLM `fused_experts`, the model's shared expert; published shapes, bf16,
random weights, scripted routing; the device script bench/gpu/vllm_fused_layer.py runs it too),
here as pytest-benchmark cases, so that `--benchmark-compare` gates this level too. Needs a CUDA GPU and vLLM: both markers skip the
cases with a reason elsewhere (the vLLM GPU bundle: bench/gpu/run_vllm.sh).

Every case checks first: the ids reaching the experts equal `sere.reroute(backend="reference")`
(or the scripted ids for stock), and the fused output matches a per-expert fp32 torch layer
within bf16 tolerance. Then CUDA-graph replay (bench/timing.py `benchmark_device`) of calls
cycling through independent weight copies (cold L2), per-call device time. extra_info: the
routing and similarity, activated experts before / after, bytes of expert weights read, GB/s,
HBM floor and its share, and the speed-up against the stock case of the same model, routing and
batch of this run (`layer="vllm-fused"`: sere-report and the summary table show these rows as
"<model> (vllm-fused)", apart from the transformers layer of bench/test_bench_layer.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import fused_layer as fused
from bench.timing import benchmark_device
from sere.harness.model_configs import REAL_MODELS
from sere.harness.settings import DECODE_BATCHES, STOCK_AND_GRID, STOCK_AND_PAPER

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]

ROUTINGS = tuple(s.strip() for s in os.environ.get("SERE_BENCH_ROUTING", ",".join(fused.ROUTINGS)).split(",")
                 if s.strip())
STOCK_KEY = "vllm-fused"  # stock_times keys of this bench, apart from the transformers layer's


def _cases():
    """Stock first in every (model, routing, T), so each SERE case finds its stock time; the
    first routing gets every threshold, the others the paper's two settings."""
    out = []
    for model in REAL_MODELS:
        for routing in ROUTINGS:
            for T in DECODE_BATCHES:
                for s in STOCK_AND_GRID if routing == ROUTINGS[0] else STOCK_AND_PAPER:
                    out.append(pytest.param(model, routing, T, s.label, s.S, s.rho, id=f"{model}-{routing}-T{T}-{s.label}"))
    return out


_layer: dict[str, fused.FusedLayer] = {}

GPU_CACHE = _layer  # emptied when the module ends (bench/conftest.py)


def get_layer(model: str) -> fused.FusedLayer:
    """The model's fused layer with its weight copies, built once; one model on the GPU at a time."""
    if model not in _layer:
        _layer.clear()
        _layer[model] = fused.build_layer(model, fused.load_vllm_ops())
    return _layer[model]


@pytest.mark.parametrize(("model", "routing", "T", "setting", "S", "rho"), _cases())
def test_fused_moe_layer(benchmark, copy_bandwidth, stock_times, model, routing, T, setting, S, rho):
    layer = get_layer(model)
    case = fused.prepare_case(layer, routing, T, S, rho)
    err, problems = fused.check_case(layer, case)
    assert not problems, f"{model} {routing} T={T} {setting}: {'; '.join(problems)}"

    with torch.no_grad():
        benchmark_device(benchmark, lambda: layer(case.h), method="graph", calls=fused.CALLS, rounds=fused.ROUNDS)
    stats = getattr(benchmark, "stats", None)
    seconds = float(stats.stats.median) if stats is not None else None

    speedup = stock_times.speedup_vs_stock((STOCK_KEY, model, routing, T), seconds, stock=S is None)
    import vllm

    benchmark.extra_info.update(
        model=model, layer="vllm-fused", arch=layer.shapes.arch, size="real", device="cuda", dtype="bfloat16",
        vllm=vllm.__version__, experts_impl="vllm fused_experts (Triton)", sere_backend=None if S is None else "numba",
        timer=f"cuda-graph replay, {fused.CALLS} calls over {fused.COPIES} layer copies",
        tokens=T, setting=setting, S=S, rho=rho, check_rel_err=round(err, 5),
        **fused.case_info(layer.shapes, case, seconds, copy_bandwidth),
        speedup_vs_stock=speedup,
    )
