"""Prototype (issue 14, target 2): the routed experts of a decode batch with the K dimension split
over several thread blocks, for batches that SERE packs onto few experts.

Why: vLLM's fused_moe_kernel gives each expert ceil(N / BLOCK_SIZE_N) thread blocks that each walk
all of K. After re-routing a batch holds few distinct experts (13-15 at T = 16), so few blocks
have work and the experts read at 0.69-0.77 of their byte floor against stock's 0.92-0.95
(bench/RESULTS.md section 15). Splitting K gives SPLIT times the blocks, each a SPLIT-th as long;
the partial sums meet by atomic adds in fp32.

The layout is vLLM's (moe_align_block_size: slots sorted by expert, each expert's run padded to
BLOCK_M; one expert per M block), so on the GPU vLLM's align op feeds it; `align_reference` is the
same layout in plain torch for the CPU checks. Kernels:
  gate_up   acc1[slot, 2I] += h[token(slot)] @ w13[e]^T over this block's K range (fp32 atomics)
  down      out[token, H] += weight(slot) * (silu(g) * u)[slot] @ w2[e]^T over this block's I range,
            g and u the halves of acc1 (so the activation and the sum over k need no launch)
Then out is cast to the input dtype. Checked against a per-expert torch computation in
tests/test_vllm_splitk_experts.py with Triton's interpreter (TRITON_INTERPRET=1, CPU); timed
beside vLLM's fused_experts by bench/lab/probe_expert_waves.py on the GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter's tl.dot mishandles bf16 operands (measured: garbage with Triton 3.9 on the
# CPU); there the tiles are widened to fp32 first. On the GPU the dot stays bf16 (tensor cores).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _block_slots(sorted_ptr, expert_ptr, pid_m, num_slots, top_k, BLOCK_M: tl.constexpr):
    """This M block's expert, its slots (int64; >= num_slots: padding), which of them are live and
    their tokens."""
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    live = rows < num_slots
    rows = rows.to(tl.int64)
    return e, rows, live, rows // top_k


@triton.jit
def _weight_tile(w_ptr, e, n, n_ok, ks, k_ok, N, K):
    """The [BLOCK_K, BLOCK_N] tile (rows ks, columns n) of expert e's weights, stored [E, N, K]."""
    return tl.load(w_ptr + e * N * K + n[None, :].to(tl.int64) * K + ks[:, None],
                   mask=k_ok[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _gate_up_kernel(h_ptr, w13_ptr, sorted_ptr, expert_ptr, n_padded_ptr, acc1_ptr,
                    H, N2, num_slots, top_k, k_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(n_padded_ptr):
        return  # past the last expert's padded run
    e, rows, live, tok = _block_slots(sorted_ptr, expert_ptr, pid_m, num_slots, top_k, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, H), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + tok[:, None] * H + ks[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
        b = _weight_tile(w13_ptr, e, n, n_ok, ks, k_ok, N2, H)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b)
    tl.atomic_add(acc1_ptr + rows[:, None] * N2 + n[None, :], acc, mask=live[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(acc1_ptr, w2_ptr, weight_ptr, sorted_ptr, expert_ptr, n_padded_ptr, out_ptr,
                 H, I, num_slots, top_k, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(n_padded_ptr):
        return
    e, rows, live, tok = _block_slots(sorted_ptr, expert_ptr, pid_m, num_slots, top_k, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (H)
    n_ok = n < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, I), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        m = live[:, None] & k_ok[None, :]
        g = tl.load(acc1_ptr + rows[:, None] * 2 * I + ks[None, :], mask=m, other=0.0)
        u = tl.load(acc1_ptr + rows[:, None] * 2 * I + I + ks[None, :], mask=m, other=0.0)
        a = (g * tl.sigmoid(g) * u).to(w2_ptr.dtype.element_ty)  # silu(g) * u, rounded as vLLM's activation output
        b = _weight_tile(w2_ptr, e, n, n_ok, ks, k_ok, H, I)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b)
    w = tl.load(weight_ptr + rows, mask=live, other=0.0)
    tl.atomic_add(out_ptr + tok[:, None] * H + n[None, :], acc * w[:, None], mask=live[:, None] & n_ok[None, :])


def align_reference(ids: torch.Tensor, block_m: int, num_experts: int):
    """vLLM's moe_align_block_size layout in plain torch: (sorted slot ids [EM] padded with T*k,
    expert of each M block [EM / block_m] (-1 past the end), [1] count of padded slots), EM =
    T*k + E*(block_m - 1) rounded up to block_m. Slots of one expert keep their order."""
    flat = ids.flatten().long()
    num_slots = flat.numel()
    em = -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((em,), num_slots, dtype=torch.int32)
    expert_ids = torch.full((em // block_m,), -1, dtype=torch.int32)
    pos = 0
    for e in range(num_experts):
        slots = (flat == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        sorted_ids[pos:pos + slots.numel()] = slots.to(torch.int32)
        blocks = -(-slots.numel() // block_m)
        expert_ids[pos // block_m:pos // block_m + blocks] = e
        pos += blocks * block_m
    return sorted_ids.to(ids.device), expert_ids.to(ids.device), torch.tensor([pos], dtype=torch.int32, device=ids.device)


def vllm_align(ids: torch.Tensor, block_m: int, num_experts: int):
    """vLLM's own align op (CUDA), the same layout as align_reference."""
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

    sorted_ids, expert_ids, n_padded = moe_align_block_size(ids, block_m, num_experts)[:3]
    return sorted_ids, expert_ids, n_padded


def splitk_experts(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor, *, split: int = 4, block_m: int = 16, block_n: int = 64, block_k: int = 128,
                   align=None) -> torch.Tensor:
    """sum over slots j of weights[t, j] * expert_{ids[t, j]}(h[t]) for every token t: h [T, H],
    w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], weights/ids [T, k]. Ids must be valid
    (0 <= id < E). align: the layout function (default vLLM's op on CUDA, align_reference else)."""
    T, k = ids.shape
    E, N2, H = w13.shape
    I = N2 // 2
    if w2.shape != (E, H, I) or h.shape != (T, H) or weights.shape != (T, k):
        raise ValueError(f"shapes do not match: h {tuple(h.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, "
                         f"weights {tuple(weights.shape)}, ids {tuple(ids.shape)}")
    align = align or (vllm_align if ids.is_cuda else align_reference)
    sorted_ids, expert_ids, n_padded = align(ids, block_m, E)
    acc1 = torch.zeros(T * k, N2, device=h.device, dtype=torch.float32)
    out = torch.zeros(T, H, device=h.device, dtype=torch.float32)
    m_blocks = expert_ids.numel()  # one per M block of the layout, most past its end

    def per_split(K: int) -> int:  # K range of one split, whole BLOCK_K tiles
        return triton.cdiv(triton.cdiv(K, block_k), split) * block_k

    h, w13, w2 = h.contiguous(), w13.contiguous(), w2.contiguous()
    _gate_up_kernel[(m_blocks, triton.cdiv(N2, block_n), split)](
        h, w13, sorted_ids, expert_ids, n_padded, acc1, H, N2, T * k, k, per_split(H),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=INTERPRETING)
    _down_kernel[(m_blocks, triton.cdiv(H, block_n), split)](
        acc1, w2, weights.float().contiguous(), sorted_ids, expert_ids, n_padded, out, H, I, T * k, k, per_split(I),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=INTERPRETING)
    return out.to(h.dtype)
