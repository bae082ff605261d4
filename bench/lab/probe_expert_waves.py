"""Device probe (issue 14, target 2): why vLLM's fused MoE reads SERE's experts below their byte
floor. The layer bench (bench/RESULTS.md section 15) measured the routed experts at 0.92-0.95 of
their floor with 38-82 distinct experts and at 0.69-0.77 with 13-15, whatever the model. The
suspect: vLLM's fused_moe_kernel gives each expert ceil(N / BLOCK_SIZE_N) thread blocks, so few
experts leave few blocks with work and the last wave's tail weighs heavily.

This holds T (tokens) fixed and varies only n, the number of distinct experts the T x k slots
go to (each token takes k of the same n experts: min(n, k) distinct, the rest repeats, as after
re-routing), and times vLLM's `fused_experts` alone (no router, no shared expert) by CUDA-graph
replay over 8 weight copies (cold L2, as the layer bench). Per row: working thread blocks of the
two GEMMs (M tiles x N tiles, under vLLM's own tile choice for M = T) per SM, time,
byte floor (distinct experts x expert bytes / copy rate) and its share; then the same with
BLOCK_SIZE_N halved (twice the blocks, each half as long), and with the split-K prototype
(bench/lab/splitk_experts.py: SPLIT times the blocks, each a SPLIT-th of K). If the share follows
the blocks per SM and the two variants lift the small-n rows, the wave count is the cause and a
kernel with more, shorter blocks per expert is the remedy; if not, it is something else.

    python -m bench.lab.probe_expert_waves [--models Qwen3-30B-A3B,...] [--tokens 16,64]
        (a CUDA machine with vLLM's GPU bundle on PYTHONPATH, from the repo root)
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

EXPERT_COUNTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def routing_over(n: int, T: int, k: int, E: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, k) int32 over min(n, T k) distinct experts drawn from E and softmax weights (T, k)
    float32. The slots walk the n experts cyclically, so every one is used and a token's k slots
    are distinct where n >= k (where n < k each token holds all n, some twice)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(E, generator=gen)[:n]  # the n experts, in random order
    ids = chosen[torch.arange(T * k) % n].view(T, k).to(torch.int32)
    weights = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    return ids, weights


def halved_n(cfg: dict) -> dict:
    """vLLM's tile config with BLOCK_SIZE_N halved (at least 16)."""
    return dict(cfg, BLOCK_SIZE_N=max(16, cfg["BLOCK_SIZE_N"] // 2))


def working_blocks(distinct: int, slots: int, block_m: int, n_size: int, block_n: int) -> int:
    """Thread blocks with work in one GEMM of vLLM's kernel: per expert, its M tiles (its rows over
    BLOCK_SIZE_M; the probe spreads the slots evenly) times the N tiles."""
    rows = math.ceil(slots / distinct)
    return distinct * math.ceil(rows / block_m) * math.ceil(n_size / block_n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="Qwen3-30B-A3B,Qwen1.5-MoE-A2.7B")
    p.add_argument("--tokens", default="16,64")
    p.add_argument("--split", type=int, default=4, help="K split of the prototype")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_expert_waves: needs a CUDA device and vLLM's fused MoE", file=sys.stderr)
        return 2
    from bench import fused_layer as fused
    from bench.gpu.tune_fused_moe import forced_tiles
    from bench.lab.splitk_experts import splitk_experts
    from bench.timing import measure_copy_bandwidth, time_graph_replay
    from sere.stats import distinct_experts
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    vllm_ops = fused.load_vllm_ops()
    bw = measure_copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy {bw / 1e9:.0f} GB/s; fused_experts alone, CUDA-graph replay, "
          f"{fused.COPIES} weight copies cycled")
    print("| model | T | distinct experts | vLLM tiles M/N/K | blocks per SM (gate-up, down) | us | floor us | "
          f"floor share | share, N tile halved | share, split-K x{args.split} prototype |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        layer = fused.build_layer(model, vllm_ops)
        s = layer.shapes
        E, k, H, I = s.num_experts, s.top_k, s.hidden_size, s.moe_intermediate_size
        w0 = layer.copies[0]
        for T, n in itertools.product((int(t) for t in args.tokens.split(",")), EXPERT_COUNTS):
            if n > E:
                continue
            ids, weights = routing_over(n, T, k, E)
            ids, weights = ids.cuda(), weights.cuda()
            h = torch.randn(T, H, device="cuda", dtype=fused.DTYPE)
            distinct = int(distinct_experts(ids, E))
            turn = itertools.count()

            def experts():
                w = layer.copies[next(turn) % len(layer.copies)]
                return layer.fused_experts(h, w.w13, w.w2, weights, ids, global_num_experts=E)

            def split_k():
                w = layer.copies[next(turn) % len(layer.copies)]
                return splitk_experts(h, w.w13, w.w2, weights, ids, split=args.split)

            with torch.no_grad():
                ref = fused.reference_layer(w0, h, ids, weights)
                if w0.shared_w13 is not None:
                    ref = ref - fused.shared_mlp(w0, h).float()  # the probe times the routed experts only
                got = layer.fused_experts(h, w0.w13, w0.w2, weights, ids, global_num_experts=E).float()
                err = fused.rel_err(got, ref)
                err_s = fused.rel_err(splitk_experts(h, w0.w13, w0.w2, weights, ids, split=args.split).float(), ref)
                cfg = try_get_optimal_moe_config(w0.w13.shape, w0.w2.shape, k, None, T)
                us = time_graph_replay(experts, calls=fused.CALLS, repeats=fused.ROUNDS).median_us
                with forced_tiles(halved_n(cfg)):
                    us_half = time_graph_replay(experts, calls=fused.CALLS, repeats=fused.ROUNDS).median_us
                us_split = time_graph_replay(split_k, calls=fused.CALLS, repeats=fused.ROUNDS).median_us
            floor_us = fused.experts_floor_s(s, distinct, bw) * 1e6
            bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
            blocks = [working_blocks(distinct, T * k, bm, size, bn) / sms for size in (2 * I, H)]
            flag = "" if err <= fused.CHECK_TOL else f" (CHECK FAILED: rel err {err:.3g})"
            split_cell = f"{floor_us / us_split:.2f}" if err_s <= fused.CHECK_TOL else f"WRONG (rel err {err_s:.3g})"
            print(f"| {model} | {T} | {distinct}{flag} | {bm}/{bn}/{cfg['BLOCK_SIZE_K']} | "
                  f"{blocks[0]:.1f}, {blocks[1]:.1f} | {us:.1f} | {floor_us:.1f} | {floor_us / us:.2f} | "
                  f"{floor_us / us_half:.2f} | {split_cell} |", flush=True)
        layer = None  # free this model's copies before the next is built
    return 0


if __name__ == "__main__":
    sys.exit(main())
