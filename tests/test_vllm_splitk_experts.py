"""The split-K expert prototype (bench/lab/splitk_experts.py) against a per-expert torch
computation, run by Triton's interpreter on the CPU (the vllm env brings Triton; the GPU timing is
bench/lab/probe_expert_waves.py's). Each case runs in a subprocess because the interpreter must be
chosen before the kernels are defined."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the vllm env)")]

CHECK = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from bench.lab.splitk_experts import align_reference, splitk_experts

    def reference(h, w13, w2, weights, ids):
        out = torch.zeros(h.shape, dtype=torch.float32)
        for t in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                e = int(ids[t, j])
                g, u = (w13[e].float() @ h[t].float()).chunk(2)
                a = (F.silu(g) * u).to(h.dtype).float()  # the prototype rounds the activation like vLLM
                out[t] += weights[t, j] * (w2[e].float() @ a)
        return out

    T, k, E, H, I, split, n = (int(x) for x in sys.argv[1:8])
    gen = torch.Generator().manual_seed(T * 100 + n)
    h = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    w13 = (0.1 * torch.randn(E, 2 * I, H, generator=gen)).to(torch.bfloat16)
    w2 = (0.1 * torch.randn(E, H, I, generator=gen)).to(torch.bfloat16)
    chosen = torch.randperm(E, generator=gen)[:n]  # n distinct experts, as after re-routing
    ids = chosen[torch.randint(0, n, (T, k), generator=gen)].to(torch.int32)
    weights = torch.softmax(torch.randn(T, k, generator=gen), -1)
    got = splitk_experts(h, w13, w2, weights, ids, split=split, block_m=16, block_n=32, block_k=32,
                         align=align_reference).float()
    want = reference(h, w13, w2, weights, ids)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, f"relative error {err:.3g}"
    print("ok", err)
""")


@pytest.mark.parametrize("T,k,E,H,I,split,n", [
    (1, 4, 8, 64, 48, 1, 4),     # one token, K not a multiple of the tile
    (5, 4, 8, 64, 48, 3, 2),     # a token holding one expert in several slots; K split 3 ways
    (20, 2, 6, 96, 32, 4, 6),    # an expert with more slots than BLOCK_M (two M blocks)
])
def test_splitk_experts_matches_the_per_expert_sum(T, k, E, H, I, split, n):
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [str(x) for x in (T, k, E, H, I, split, n)]
    run = subprocess.run([sys.executable, "-c", CHECK, *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]


def test_align_reference_lays_out_slots_like_vllm():
    # vLLM's documented example (moe_align_block_size): ids 1-based there, 0-based here.
    import torch

    from bench.lab.splitk_experts import align_reference

    ids = torch.tensor([[1, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2]])
    sorted_ids, expert_ids, n_padded = align_reference(ids, 4, 4)
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert expert_ids[:4].tolist() == [0, 1, 2, 3] and (expert_ids[4:] == -1).all()
    assert n_padded.tolist() == [16]


def test_kernels_compile_for_hopper():
    # The interpreter checks the arithmetic, not the GPU build: compile both kernels for sm_90 ahead
    # of time (Triton's own ptxas, no GPU needed) with the tiles the probe uses, bf16 operands, and
    # check that the dot became tensor-core MMA and the partial sums atomics.
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.lab import splitk_experts as sk

    tiles = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, UPCAST=False)
    layout = {"sorted_ptr": "*i32", "expert_ptr": "*i32", "n_padded_ptr": "*i32"}
    sizes = {"num_slots": "i32", "top_k": "i32", "k_per_split": "i32"}
    signatures = {
        sk._gate_up_kernel: {"h_ptr": "*bf16", "w13_ptr": "*bf16", **layout, "acc1_ptr": "*fp32", "H": "i32", "N2": "i32"},
        sk._down_kernel: {"acc1_ptr": "*fp32", "w2_ptr": "*bf16", "weight_ptr": "*fp32", **layout, "out_ptr": "*fp32",
                          "H": "i32", "I": "i32"},
    }
    for fn, sig in signatures.items():
        sig = {**sig, **sizes, **{name: "constexpr" for name in tiles}}
        assert list(sig) == fn.arg_names, f"{fn.__name__}: signature out of date"
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=tiles), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert "mma" in ptx and ("atom." in ptx or "red." in ptx), fn.__name__
