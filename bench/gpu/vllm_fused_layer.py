"""One MoE layer on vLLM's fused MoE kernel (Triton `fused_experts`), stock routing vs SERE.

On a Hopper GPU (repo root; vLLM 0.26 bundle on PYTHONPATH, this package installed):
    python3 bench/gpu/vllm_fused_layer.py --out $OUT/fused
Argument check on any machine (no kernel runs):  python3 bench/gpu/vllm_fused_layer.py --list

The layer (per model, published shapes from sere.harness.model_configs, bf16, random weights):
  router   h @ W_r^T (E x H), then vLLM's `fused_topk` (softmax + top-k, the CUDA kernel the
           engine's FusedTopKRouter runs); its ids are then REPLACED by the case's scripted
           routing (uniform or Zipf, bench/routing.py), so the routing is known and stated
  SERE     `sere.reroute(ids, sim, S, rho, backend="numba")` on the int32 ids (the one-launch
           Numba kernel, as in the engine); similarity synthetic (bench/routing.py)
  experts  vLLM's `fused_experts(h, w13, w2, weights, ids)`: the unquantized Triton path
           (moe_align_block_size, fused_moe_kernel x 2, silu_and_mul, moe_sum) that vLLM 0.26's
           TritonExperts run on Hopper, with vLLM's own block-size choice for (E, N, T)
  shared   the model's always-on shared expert MLP (Qwen1.5: 5632 wide with a sigmoid gate;
           DeepSeek-V2-Lite: 2 x 1408; Qwen3: none), plain bf16 matmuls
Every case is checked first: the ids reaching the experts equal the reference re-routing, and
the fused output equals a per-expert torch computation of the same layer (bf16 tolerance).
Timing: CUDA-graph replay (bench/timing.py) of CALLS layer calls cycling through COPIES
independent weight copies (cold L2: one Qwen3 expert is 9.4 MB, L2 is 50 MB), median of
ROUNDS replays, per-call device time. Stock comes first per (model, routing, T); speed-up =
stock / SERE from the same run. Bytes = (distinct experts after SERE x 3 H I + shared) x 2;
HBM floor = bytes / measured copy bandwidth (1 GiB device copy, read + write counted).
Results: $OUT/vllm_fused_layer.json and $OUT/vllm_fused_layer.md.
Index letters: T tokens, k experts per token, E experts, H hidden, I expert intermediate.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # bench/routing.py, bench/timing.py

from routing import make_routing, synthetic_similarity  # noqa: E402

from sere import reroute  # noqa: E402
from sere.harness.model_configs import REAL_MODELS, layer_shapes  # noqa: E402
from sere.stats import distinct_experts  # noqa: E402

SETTINGS = (("stock", None, None), ("S1-rho0", 1, 0.0), ("S2-rho0.1", 2, 0.1))
BATCHES = (1, 8, 16, 32, 64, 128, 256)
ROUTINGS = ("uniform", "zipf:1.2")
COPIES, CALLS, ROUNDS = 8, 24, 10
SEED = 0
CHECK_TOL = 3e-2  # bf16 kernel vs fp32 reference, error relative to the largest output
DTYPE = torch.bfloat16


@dataclass
class LayerWeights:
    """One copy of the layer's weights."""

    router: torch.Tensor  # E, H
    w13: torch.Tensor  # E, 2I, H (gate rows then up rows, vLLM's layout)
    w2: torch.Tensor  # E, H, I
    shared_w13: torch.Tensor | None  # 2Is, H
    shared_w2: torch.Tensor | None  # H, Is
    shared_gate: torch.Tensor | None  # 1, H (Qwen1.5's sigmoid gate of the shared expert)


def build_copy(shapes, gen: torch.Generator, device) -> LayerWeights:
    E, H, I, Is = shapes.num_experts, shapes.hidden_size, shapes.moe_intermediate_size, shapes.shared_intermediate_size

    def draw(*shape):
        return torch.empty(*shape, device=device, dtype=DTYPE).normal_(0.0, 0.02, generator=gen)

    shared = Is > 0
    return LayerWeights(
        router=draw(E, H), w13=draw(E, 2 * I, H), w2=draw(E, H, I),
        shared_w13=draw(2 * Is, H) if shared else None, shared_w2=draw(H, Is) if shared else None,
        shared_gate=draw(1, H) if shared and shapes.arch == "qwen2_moe" else None,
    )


def shared_mlp(w: LayerWeights, h: torch.Tensor) -> torch.Tensor | None:
    if w.shared_w13 is None:
        return None
    gate, up = F.linear(h, w.shared_w13).chunk(2, dim=-1)  # T, Is each
    out = F.linear(F.silu(gate) * up, w.shared_w2)  # T, H
    if w.shared_gate is not None:
        out = torch.sigmoid(F.linear(h, w.shared_gate)) * out  # T, H
    return out


class FusedLayer:
    """Router + (SERE) + vLLM fused experts + shared expert, on one weight copy per call."""

    def __init__(self, shapes, copies: list[LayerWeights], vllm_ops):
        self.shapes, self.copies = shapes, copies
        self.fused_topk, self.fused_experts = vllm_ops
        self.ids = self.weights = None  # scripted routing, T, k
        self.sim, self.S, self.rho = None, None, None
        self.turn = itertools.count()

    def script(self, ids: torch.Tensor, weights: torch.Tensor, sim: torch.Tensor, S, rho) -> None:
        dev = self.copies[0].w2.device
        self.ids = ids.to(dev, torch.int32).contiguous()  # T, k
        self.weights = weights.to(dev, torch.float32).contiguous()  # T, k
        self.sim = sim.to(dev, torch.float32).contiguous()  # E, E
        self.S, self.rho = S, rho

    def route(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w.router)  # T, E
        self.fused_topk(h, logits, self.shapes.top_k, False)  # the real router's work; the script answers
        if self.S is None:
            return self.ids
        return reroute(self.ids, self.sim, self.S, self.rho, backend="numba")  # T, k int32

    def __call__(self, h: torch.Tensor, copy: int | None = None) -> torch.Tensor:
        w = self.copies[next(self.turn) % len(self.copies) if copy is None else copy]
        ids = self.route(w, h)
        out = self.fused_experts(h, w.w13, w.w2, self.weights, ids, global_num_experts=self.shapes.num_experts)  # T, H
        shared = shared_mlp(w, h)
        return out if shared is None else out + shared


def reference_layer(w: LayerWeights, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same layer with plain torch, one expert at a time (fp32 accumulation)."""
    out = torch.zeros(h.shape, device=h.device, dtype=torch.float32)  # T, H
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(h[tok].float(), w.w13[e].float()).chunk(2, dim=-1)  # n, I each
        y = F.linear(F.silu(gate) * up, w.w2[e].float())  # n, H
        out.index_add_(0, tok, y * weights[tok, slot, None].float())
    shared = shared_mlp(w, h)
    return out if shared is None else out + shared.float()


def load_vllm_ops():
    """vLLM's fused_topk and fused_experts; a clear error where they cannot run."""
    if not torch.cuda.is_available():
        raise SystemExit("vllm_fused_layer: vLLM's fused MoE kernel is Triton/CUDA only and this machine has no "
                         "CUDA device (use --list to check the arguments here)")
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts, fused_topk
    except ImportError as exc:
        raise SystemExit(f"vllm_fused_layer: cannot import vLLM's fused MoE ({exc}); put the vLLM GPU bundle on "
                         "PYTHONPATH (bench/gpu/run_vllm.sh)") from None
    return fused_topk, fused_experts


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy (read + write counted): bench/conftest.py's measurement."""
    spec = importlib.util.spec_from_file_location("sere_bench_conftest", BENCH / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.measure_copy_bandwidth("cuda")


@dataclass
class Case:
    """One scripted case on a FusedLayer: its routing, similarity, input and expected ids."""

    routing: object  # bench/routing.py Routing (ids, weights, label)
    sim: torch.Tensor  # E, E
    h: torch.Tensor  # T, H on the GPU
    want: torch.Tensor  # T, k: the ids the experts must receive


def prepare_case(layer: FusedLayer, routing: str, T: int, S, rho) -> Case:
    """Script the layer with the case's routing and SERE setting; the input and the expected ids."""
    shapes = layer.shapes
    r = make_routing(routing, T, shapes.num_experts, shapes.top_k, seed=SEED)
    sim = synthetic_similarity(shapes.num_experts, seed=SEED)
    layer.script(r.ids, r.weights, sim, S, rho)
    h = torch.randn(T, shapes.hidden_size, generator=torch.Generator().manual_seed(SEED + T)).to("cuda", DTYPE)  # T, H
    want = r.ids if S is None else reroute(r.ids, sim, S, rho, backend="reference")
    return Case(r, sim, h, want)


def check_case(layer: FusedLayer, case: Case) -> tuple[float, list[str]]:
    """(relative error of the fused output, problems): the ids reaching the experts against the
    reference re-routing, the output against the per-expert torch layer."""
    problems = []
    with torch.no_grad():
        ids = layer.route(layer.copies[0], case.h)
        if not torch.equal(ids.cpu().long(), case.want.long()):
            problems.append("ids reaching the experts differ from the reference re-routing")
        got = layer(case.h, copy=0).float()
        ref = reference_layer(layer.copies[0], case.h, ids, layer.weights)
        err = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    if not torch.isfinite(got).all() or not err <= CHECK_TOL:
        problems.append(f"fused output differs from the torch reference (max abs err / max abs = {err:.3g})")
    return err, problems


def case_info(shapes, case: Case, seconds: float | None, bw: float) -> dict:
    """Experts before/after, bytes of expert weights read, GB/s and the HBM floor of one case."""
    E = shapes.num_experts
    after = int(distinct_experts(case.want, E))
    elem = torch.finfo(DTYPE).bits // 8
    expert_bytes = (after * shapes.expert_params() + shapes.shared_params()) * elem
    floor_s = expert_bytes / bw
    return dict(routing=case.routing.label, similarity="synthetic uniform [0,1) symmetric",
                E=E, k=shapes.top_k, hidden=shapes.hidden_size, moe_intermediate=shapes.moe_intermediate_size,
                shared_intermediate=shapes.shared_intermediate_size,
                experts_before=int(distinct_experts(case.routing.ids, E)), experts_after=after,
                expert_bytes=expert_bytes, copy_bw_gbps=round(bw / 1e9, 1), hbm_floor_us=round(floor_s * 1e6, 2),
                time_us=None if seconds is None else round(seconds * 1e6, 2),
                gbps=None if seconds is None else round(expert_bytes / seconds / 1e9, 1),
                hbm_floor_share=None if seconds is None else round(floor_s / seconds, 3))


def run_case(layer: FusedLayer, model: str, routing: str, T: int, setting: str, S, rho, bw: float, stock: dict) -> dict:
    from timing import time_graph_replay

    case = prepare_case(layer, routing, T, S, rho)
    err, problems = check_case(layer, case)  # check first, then time
    for msg in problems:
        print(f"CHECK FAILED {model} {routing} T={T} {setting}: {msg}", flush=True)
    with torch.no_grad():
        timing = time_graph_replay(lambda: layer(case.h), calls=CALLS, repeats=ROUNDS)
    seconds = timing.median_us * 1e-6
    key = (model, routing, T)
    if S is None:
        stock[key] = seconds
    base = stock.get(key)
    return dict(model=model, tokens=T, setting=setting, S=S, rho=rho, **case_info(layer.shapes, case, seconds, bw),
                time_min_us=round(timing.min_us, 2), check_rel_err=round(err, 5), check_failed=problems,
                speedup_vs_stock=None if base is None else round(base / seconds, 3))


def markdown(rows: list[dict]) -> str:
    lines = []
    for (model, routing), group in itertools.groupby(rows, key=lambda r: (r["model"], r["routing"])):
        group = list(group)
        lines += [f"#### {model}, routing `{routing}`", "",
                  "| T | setting | experts before -> after | us | GB/s | floor us | floor share | vs stock |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in group:
            sp = "" if r["speedup_vs_stock"] is None else f"{r['speedup_vs_stock']:.2f}x"
            if r.get("error"):
                lines.append(f"| {r['tokens']} | {r['setting']} | ERROR: {r['error'][:80]} | | | | | |")
                continue
            sp += " CHECK FAILED" if r.get("check_failed") else ""
            lines.append(f"| {r['tokens']} | {r['setting']} | {r['experts_before']} -> {r['experts_after']} | "
                         f"{r['time_us']:.1f} | {r['gbps']:.0f} | {r['hbm_floor_us']:.1f} | {r['hbm_floor_share']:.2f} | {sp} |")
        lines.append("")
    return "\n".join(lines)


def plan(models, routings, batches):
    return [(m, rt, T, label, S, rho) for m in models for rt in routings for T in batches for label, S, rho in SETTINGS]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vllm_fused_layer")))
    p.add_argument("--models", default=",".join(REAL_MODELS), help="comma-separated, from sere.harness.model_configs.REAL_MODELS")
    p.add_argument("--routings", default=",".join(ROUTINGS), help="bench/routing.py specs")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=list(BATCHES))
    p.add_argument("--deadline", type=float, default=600, help="seconds; cases left then are skipped and reported")
    p.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in REAL_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(REAL_MODELS)}")
    routings = [s.strip() for s in args.routings.split(",") if s.strip()]
    for spec in routings:
        make_routing(spec, 2, 8, 2)  # a bad spec fails here, not after minutes of GPU work
    if any(T < 1 for T in args.batches):
        p.error("batches must be >= 1")
    cases = plan(models, routings, args.batches)
    if args.list:
        for c in cases:
            print(*c)
        print(f"{len(cases)} cases")
        return 0

    vllm_ops = load_vllm_ops()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; {len(cases)} cases", flush=True)
    rows, stock, skipped = [], {}, []
    from tqdm import tqdm

    for model in models:
        shapes = layer_shapes(model)
        gen = torch.Generator("cuda").manual_seed(SEED)
        torch.cuda.empty_cache()
        layer = FusedLayer(shapes, [build_copy(shapes, gen, "cuda") for _ in range(COPIES)], vllm_ops)
        for case in tqdm([c for c in cases if c[0] == model], desc=model, file=sys.stdout, mininterval=5):
            if time.perf_counter() - started > args.deadline:
                skipped.append(case)
                continue
            try:
                rows.append(run_case(layer, *case, bw=bw, stock=stock))
            except Exception as exc:  # noqa: BLE001 - one broken case must not cost the rest of the device run
                import traceback

                traceback.print_exc()
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a broken context shows in the next case's error
                    pass
                rows.append(dict(model=case[0], routing=case[1], tokens=case[2], setting=case[3], S=case[4], rho=case[5],
                                 error=f"{type(exc).__name__}: {exc}"))
        del layer
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "copy_bw_gbps": round(bw / 1e9, 1), "copies": COPIES, "calls_per_graph": CALLS, "rounds": ROUNDS,
                  "rows": rows, "skipped": [list(c) for c in skipped]}
        (args.out / "vllm_fused_layer.json").write_text(json.dumps(result, indent=2))  # partial results survive
    try:
        import vllm

        result["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - the version is a label only
        pass
    (args.out / "vllm_fused_layer.json").write_text(json.dumps(result, indent=2))
    table = markdown(rows)
    (args.out / "vllm_fused_layer.md").write_text(table)
    print(table)
    if skipped:
        print(f"{len(skipped)} cases skipped at --deadline {args.deadline:.0f} s", flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    bad = [r for r in rows if r.get("error") or r.get("check_failed")]
    if bad:
        print(f"{len(bad)} cases failed their check or raised (see CHECK FAILED / ERROR above)", flush=True)
    return 1 if skipped or bad else 0


if __name__ == "__main__":
    sys.exit(main())
