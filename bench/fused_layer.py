"""One MoE layer on vLLM's fused MoE kernel (Triton `fused_experts`), stock routing vs SERE:
the layer, its check and what a case records, shared by the pytest suite
(bench/test_bench_fused_moe.py) and the device script (python -m bench.gpu.vllm_fused_layer).

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
Every case is checked first (`check_case`): the ids reaching the experts equal the reference
re-routing, and the fused output equals a per-expert torch computation of the same layer (bf16
tolerance). Timing (bench/timing.py): CUDA-graph replay of CALLS layer calls cycling through
COPIES independent weight copies (cold L2: one Qwen3 expert is 9.4 MB, L2 is 50 MB), ROUNDS
replays, per-call device time. Stock comes first per (model, routing, T); speed-up = stock /
SERE from the same run (bench/extra_info.py). Bytes = (distinct experts after SERE x 3 H I +
shared) x 2; HBM floor = bytes / measured copy bandwidth (1 GiB device copy, read + write counted).
Index letters: T tokens, k experts per token, E experts, H hidden, I expert intermediate.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.extra_info import floor_info, layer_expert_bytes
from bench.routing import make_routing, synthetic_similarity
from sere import reroute
from sere.harness.model_configs import layer_shapes
from sere.stats import distinct_experts

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

    def __call__(self, h: torch.Tensor, copy: int | None = None, *, experts: bool = True) -> torch.Tensor:
        """The layer's output; experts=False leaves out the routed experts (fused_experts), so that
        a timing of it is the rest of the layer (see parts_info)."""
        w = self.copies[next(self.turn) % len(self.copies) if copy is None else copy]
        ids = self.route(w, h)
        shared = shared_mlp(w, h)
        if not experts:
            return ids if shared is None else shared
        out = self.fused_experts(h, w.w13, w.w2, self.weights, ids, global_num_experts=self.shapes.num_experts)  # T, H
        return out if shared is None else out + shared


def build_layer(model: str, vllm_ops) -> FusedLayer:
    """The model's layer with COPIES weight copies on the GPU, after emptying the allocator's
    cache (one model on the GPU at a time: 8 copies of Qwen3-30B-A3B's layer take 9.7 GB)."""
    torch.cuda.empty_cache()
    shapes = layer_shapes(model)
    gen = torch.Generator("cuda").manual_seed(SEED)
    return FusedLayer(shapes, [build_copy(shapes, gen, "cuda") for _ in range(COPIES)], vllm_ops)


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


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error over the largest reference value (the checks' measure)."""
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()


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
        err = rel_err(got, ref)
    if not torch.isfinite(got).all() or not err <= CHECK_TOL:
        problems.append(f"fused output differs from the torch reference (max abs err / max abs = {err:.3g})")
    return err, problems


def case_info(shapes, case: Case, seconds: float | None, bw: float) -> dict:
    """Experts before/after, bytes of expert weights read, GB/s and the HBM floor of one case."""
    E = shapes.num_experts
    after = int(distinct_experts(case.want, E))
    expert_bytes = layer_expert_bytes(shapes, after, DTYPE)
    return dict(routing=case.routing.label, similarity="synthetic uniform [0,1) symmetric",
                E=E, k=shapes.top_k, hidden=shapes.hidden_size, moe_intermediate=shapes.moe_intermediate_size,
                shared_intermediate=shapes.shared_intermediate_size,
                experts_before=int(distinct_experts(case.routing.ids, E)), experts_after=after,
                expert_bytes=expert_bytes, **floor_info(expert_bytes, seconds, bw))


def experts_floor_s(shapes, experts: int, bw: float) -> float:
    """Seconds to read `experts` routed experts' weights once at copy bandwidth bw (bytes/s)."""
    return experts * shapes.expert_params() * DTYPE.itemsize / bw


def parts_info(shapes, experts_after: int, layer_s: float, rest_s: float, bw: float) -> dict:
    """Where one case's time goes: the layer without its routed experts (router, top-k, SERE,
    shared expert: rest_us) and the routed experts as the difference (experts_us), with their own
    byte floor (distinct experts x expert weights at the copy bandwidth) and its share. A layer
    far from its floor with experts near theirs is held back by the fixed work, not the experts."""
    experts_s = layer_s - rest_s
    floor_s = experts_floor_s(shapes, experts_after, bw)
    return dict(rest_us=round(rest_s * 1e6, 2), experts_us=round(experts_s * 1e6, 2),
                experts_floor_us=round(floor_s * 1e6, 2),
                experts_floor_share=round(floor_s / experts_s, 3) if experts_s > 0 else None)
