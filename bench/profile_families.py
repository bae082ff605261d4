"""Where a decode step's GPU time goes: kernel names sorted into families, summed, and compared
between a stock and a SERE engine (for bench/gpu/profile_decode.py; plain Python, no GPU).

    fams = family_times([(name, device_us), ...])        # family -> FamilyTime(us, calls)
    print(markdown(per_engine, steps=48))                 # one table, a column pair per engine
    ideal_speedup(stock_fams, expert_ratio=12.9 / 37.5)   # if routed-expert time followed its bytes

The families follow what SERE can and cannot touch: routed experts (the fused MoE kernels, what
SERE shrinks), the re-route kernel (what it adds), the router's top-k and the MoE alignment
(fixed per step), dense GEMMs (attention projections, shared experts, the head), attention, and
the small kernels in between. The first matching rule wins, so the order of FAMILIES matters:
the shared expert is a dense GEMM, not a routed expert.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# (family, pattern over the kernel name, case-insensitive); first match wins.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("sere re-route", r"reroute|sere_"),
    ("routed experts", r"fused_moe|moe_gemm|grouped_mm"),
    ("moe align", r"moe_align|align_block|count_and_sort|sort_tokens|moe_permute"),
    ("router top-k", r"topk|top_k|gating|grouped_topk"),
    ("moe sum / reduce", r"moe_sum|reduce|sum_kernel"),
    ("attention", r"attn|attention|flash|paged|mla_|unified"),
    ("dense gemm", r"gemm|gemv|nvjet|cutlass|xmma|cublas|matmul|splitk|sm90_|sm80_"),
    ("norm", r"rms_norm|rmsnorm|layer_norm|layernorm"),
    ("activation", r"silu|gelu|act_and_mul"),
    ("rotary", r"rotary|rope"),
    ("sampling", r"sampl|argmax|topp|gumbel|logits"),
    ("copy / fill / elementwise", r"copy|memcpy|memset|fill|elementwise|vectorized|cat_|index"),
)
OTHER = "other"
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in FAMILIES)


def family_of(kernel_name: str) -> str:
    for name, pattern in _COMPILED:
        if pattern.search(kernel_name):
            return name
    return OTHER


@dataclass
class FamilyTime:
    us: float = 0.0
    calls: int = 0


def family_times(kernels) -> dict[str, FamilyTime]:
    """kernels: iterable of (name, device microseconds[, calls]) -> family -> FamilyTime."""
    out: dict[str, FamilyTime] = {}
    for item in kernels:
        name, us = item[0], float(item[1])
        calls = int(item[2]) if len(item) > 2 else 1
        if us < 0:
            raise ValueError(f"negative device time {us} us for kernel {name!r}")
        fam = out.setdefault(family_of(name), FamilyTime())
        fam.us += us
        fam.calls += calls
    return out


def total_us(fams: dict[str, FamilyTime]) -> float:
    return sum(f.us for f in fams.values())


def ideal_speedup(stock: dict[str, FamilyTime], expert_ratio: float) -> float:
    """Stock time over stock time with the routed experts' time scaled by `expert_ratio` (SERE's
    expert bytes over stock's): the step's speed-up if expert time followed the bytes read and
    nothing else changed (the re-route kernel's own time not counted)."""
    if not 0 < expert_ratio <= 1:
        raise ValueError(f"expert_ratio must be in (0, 1], got {expert_ratio}")
    total = total_us(stock)
    experts = stock.get("routed experts", FamilyTime()).us
    if total <= 0:
        raise ValueError("no device time in the stock profile")
    return total / (total - experts * (1 - expert_ratio))


def expert_cost_split(stock: FamilyTime, sere: FamilyTime, experts_stock: float, experts_sere: float):
    """(fixed us, us per distinct expert) of one routed-expert kernel launch, from stock's and SERE's
    routed-expert time at one batch and their distinct experts per layer, assuming time = fixed +
    per-expert x experts (the shape bench/lab/probe_expert_waves.py measured for vLLM's fused MoE).
    None when the two points cannot separate them (no launches, or the same expert count)."""
    if stock.calls <= 0 or sere.calls <= 0 or experts_stock - experts_sere < 1.0:
        return None
    per_stock, per_sere = stock.us / stock.calls, sere.us / sere.calls
    per_expert = (per_stock - per_sere) / (experts_stock - experts_sere)
    return per_stock - per_expert * experts_stock, per_expert


def markdown(per_engine: dict[str, dict[str, FamilyTime]], *, steps: int | None = None) -> str:
    """One table: a row per family (largest first in the first engine), per engine its ms and
    share of that engine's device time; per step when `steps` is given."""
    engines = list(per_engine)
    if not engines:
        return "(no profile)"
    scale = 1e-3 / steps if steps else 1e-3
    unit = "ms per step" if steps else "ms"
    names = sorted({f for fams in per_engine.values() for f in fams},
                   key=lambda f: -per_engine[engines[0]].get(f, FamilyTime()).us)
    head = "| family | " + " | ".join(f"{e} {unit} | {e} share" for e in engines) + " |"
    rule = "|---|" + "---:|---:|" * len(engines)
    rows = [head, rule]
    for f in names:
        cells = []
        for e in engines:
            fam, total = per_engine[e].get(f, FamilyTime()), total_us(per_engine[e])
            cells += [f"{fam.us * scale:.3f}", f"{100 * fam.us / total:.1f} %" if total else "-"]
        rows.append(f"| {f} | " + " | ".join(cells) + " |")
    rows.append("| **all kernels** | " + " | ".join(f"**{total_us(per_engine[e]) * scale:.3f}** | 100 %" for e in engines) + " |")
    return "\n".join(rows)
