"""Device probe (issue 14, target 2): how vLLM's fused MoE cost grows with the number of distinct
experts a decode batch reads, at fixed T.

It holds T (tokens) fixed and varies only n, the number of distinct experts the T x k slots go to
(each token takes k of the same n experts: min(n, k) distinct, the rest repeats, as after
re-routing), and times vLLM's `fused_experts` alone (no router, no shared expert; align, two
GEMMs, activation, sum) by CUDA-graph replay over 8 weight copies (cold L2, as the layer bench).
Per row: working thread blocks of the two GEMMs per SM, time, byte floor (distinct experts x
expert bytes / copy rate) and its share, and the share with BLOCK_SIZE_N halved (twice the
blocks). Per (model, T): a least-squares line through the rows with n >= k,
time = fixed + slope x floor, i.e. a cost paid per call whatever the bytes plus the bytes at
copy rate / slope.

Measured on the H200 (bench/RESULTS.md section 16): at T = 16 the line fits within 2-7 us with
24-28 us fixed and the bytes at 4.4-4.5 TB/s, for all three shapes; halving the N tile changes
nothing and a split-K prototype (more, shorter blocks) was slower everywhere. So the low floor
share of SERE's few experts is this fixed cost, not a per-byte loss. Nor is it the blocks that
exit at once (vLLM launches its GEMMs over the M blocks of all E experts): a grid cut to the
distinct experts' blocks saved 0-4 us per call on the H100 (section 18), so that cut (tight_grid)
was taken out again.

At T = 1 SERE sends all k slots of a token to one expert, and vLLM's small-batch path (T k 4 <= E,
no align) launches a block row per slot, each reading that expert whole: the last column merges
each token's duplicate slots into one (summed weight; the others id -1, which that path skips).
H100, Qwen3 shapes: 24.1 -> 20.6 us per call (section 18).

    python -m bench.lab.probe_expert_waves [--models Qwen3-30B-A3B,...] [--tokens 1,16,64]
        (a CUDA machine with vLLM's GPU bundle on PYTHONPATH, from the repo root)
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from sere.routing import merge_duplicate_slots

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


def fit_fixed_cost(floor_us: list[float], us: list[float]) -> tuple[float, float, float]:
    """Least squares us = fixed + slope * floor_us: (fixed us, slope, largest residual us)."""
    f, t = torch.tensor(floor_us, dtype=torch.float64), torch.tensor(us, dtype=torch.float64)
    A = torch.stack([torch.ones_like(f), f], dim=1)
    fixed, slope = torch.linalg.lstsq(A, t.unsqueeze(1)).solution.flatten().tolist()
    return fixed, slope, float((fixed + slope * f - t).abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="Qwen3-30B-A3B,Qwen1.5-MoE-A2.7B,DeepSeek-V2-Lite")
    p.add_argument("--tokens", default="16,64")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_expert_waves: needs a CUDA device and vLLM's fused MoE", file=sys.stderr)
        return 2
    from bench import fused_layer as fused
    from bench.gpu.tune_fused_moe import forced_tiles
    from bench.timing import measure_copy_bandwidth, time_graph_replay
    from sere.stats import distinct_experts
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    vllm_ops = fused.load_vllm_ops()
    bw = measure_copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy {bw / 1e9:.0f} GB/s; fused_experts alone, CUDA-graph replay, "
          f"{fused.COPIES} weight copies cycled")
    print("| model | T | distinct experts | vLLM tiles M/N/K | blocks per SM (gate-up, down) | us | floor us | "
          "floor share | share, N tile halved | us, duplicate slots merged |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        layer = fused.build_layer(model, vllm_ops)
        s = layer.shapes
        E, k, H, I = s.num_experts, s.top_k, s.hidden_size, s.moe_intermediate_size
        w0 = layer.copies[0]
        series: dict[int, list[tuple[float, float]]] = {}  # T -> (floor, us) rows
        tokens = [int(t) for t in args.tokens.split(",")]
        # past T k slots more experts change nothing: each distinct count once
        for T, n in ((T, n) for T in tokens for n in sorted({min(c, T * k) for c in EXPERT_COUNTS if c <= E})):
            ids, weights = routing_over(n, T, k, E)
            ids, weights = ids.cuda(), weights.cuda()
            h = torch.randn(T, H, device="cuda", dtype=fused.DTYPE)
            distinct = int(distinct_experts(ids, E))
            turn = itertools.count()

            def experts_over(slot_ids, slot_weights):
                """vLLM's fused_experts on these slots, a different weight copy each call (cold L2)."""
                def run():
                    w = layer.copies[next(turn) % len(layer.copies)]
                    return layer.fused_experts(h, w.w13, w.w2, slot_weights, slot_ids, global_num_experts=E)
                return run

            experts = experts_over(ids, weights)

            with torch.no_grad():
                ref = fused.reference_layer(w0, h, ids, weights)
                if w0.shared_w13 is not None:
                    ref = ref - fused.shared_mlp(w0, h).float()  # the probe times the routed experts only
                got = layer.fused_experts(h, w0.w13, w0.w2, weights, ids, global_num_experts=E).float()
                err = fused.rel_err(got, ref)
                cfg = try_get_optimal_moe_config(w0.w13.shape, w0.w2.shape, k, None, T)
                us = time_graph_replay(experts, calls=fused.CALLS, repeats=fused.ROUNDS).median_us
                with forced_tiles(halved_n(cfg)):
                    us_half = time_graph_replay(experts, calls=fused.CALLS, repeats=fused.ROUNDS).median_us

                # Merged duplicates (id -1): only where vLLM takes its small-batch path, which
                # writes zeros for -1 (the aligned path would leave those rows unwritten).
                merged = "n/a"
                m_ids, m_weights = merge_duplicate_slots(ids, weights, E)
                if T * k * 4 <= E and bool((m_ids < 0).any()):
                    got_m = layer.fused_experts(h, w0.w13, w0.w2, m_weights, m_ids, global_num_experts=E).float()
                    m_err = fused.rel_err(got_m, ref)
                    us_m = time_graph_replay(experts_over(m_ids, m_weights), calls=fused.CALLS,
                                             repeats=fused.ROUNDS).median_us
                    merged = f"{us_m:.1f}" + ("" if m_err <= fused.CHECK_TOL else f" (CHECK FAILED: rel err {m_err:.3g})")
            floor_us = fused.experts_floor_s(s, distinct, bw) * 1e6
            bm, bn = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
            blocks = [working_blocks(distinct, T * k, bm, size, bn) / sms for size in (2 * I, H)]
            flag = "" if err <= fused.CHECK_TOL else f" (CHECK FAILED: rel err {err:.3g})"
            print(f"| {model} | {T} | {distinct}{flag} | {bm}/{bn}/{cfg['BLOCK_SIZE_K']} | "
                  f"{blocks[0]:.1f}, {blocks[1]:.1f} | {us:.1f} | {floor_us:.1f} | {floor_us / us:.2f} | "
                  f"{floor_us / us_half:.2f} | {merged} |", flush=True)
            if n >= k:
                series.setdefault(T, []).append((floor_us, us))
        for T, rows in series.items():  # printed per model, so a cut-off run keeps what it finished
            if len(rows) < 2:
                continue
            fixed, slope, worst = fit_fixed_cost(*zip(*rows))
            print(f"| {model} | {T} | fit over n >= k: time = {fixed:.1f} us per call + bytes at "
                  f"{bw / slope / 1e9:.0f} GB/s (largest residual {worst:.1f} us, {len(rows)} rows) ||||||||", flush=True)
        layer = None  # free this model's copies before the next is built
    return 0


if __name__ == "__main__":
    sys.exit(main())
