"""From the rows of bench/ep_simulation.py to its report: the global set's cost model
(`Assumptions`, `verdicts`), the markdown (findings, assumptions, tables) and the plot.

    paths = write_report(rows, meta, Assumptions(), Path("bench/results"))

The findings are computed from the rows (no number in them is typed in), so a rerun with other
assumptions or settings rewrites them consistently.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bench.ep_model import MODELS

MAIN = "S=1 rho=0"  # the main setting: every secondary slot moves
LOSS_SHARE = 0.02  # a gain or loss smaller than this share of stock's layer time counts as a draw


@dataclass(frozen=True)
class Assumptions:
    """What turns counts into time. Each is an assumption, stated in the report with its source."""

    hbm_gbps: float = 3000.0  # weight streaming, GB/s per GPU
    gpus_per_node: int = 8  # D above this crosses nodes
    collective_us_node: float = 8.0  # the global set's all-reduce of an E-byte mask, within a node
    collective_us_cross: float = 25.0  # the same across nodes
    link_gbps_node: float = 150.0  # all-to-all bandwidth per GPU within a node
    link_gbps_cross: float = 45.0  # all-to-all bandwidth per GPU across nodes

    SOURCES = {
        "hbm_gbps": "H100 SXM: 3.35 TB/s spec, ~90 % reachable when streaming weights (the project measured "
                    "copies at ~2.4 TB/s read+write on an H100 and 4.0-4.3 TB/s on an H200, DESIGN.md); "
                    "a faster memory makes each saved expert worth less time",
        "gpus_per_node": "8 GPUs per node (HGX H100/H200)",
        "collective_us_node": "a latency-bound all-reduce of a few hundred bytes on NVLink within a node: a few "
                              "to ~10 us (NCCL's low-latency protocol, or a one-shot custom all-reduce such as "
                              "vLLM's); not measured here",
        "collective_us_cross": "the same across nodes over InfiniBand: a few tens of us; not measured here",
        "link_gbps_node": "DeepEP's published intranode EP8 dispatch / combine: 153 / 158 GB/s NVLink (H800)",
        "link_gbps_cross": "DeepEP's published internode EP16-64 dispatch / combine: 43-47 GB/s RDMA "
                           "(CX7 400 Gb/s)",
    }

    def collective_us(self, D: int) -> float:
        return self.collective_us_node if D <= self.gpus_per_node else self.collective_us_cross

    def link_gbps(self, D: int) -> float:
        return self.link_gbps_node if D <= self.gpus_per_node else self.link_gbps_cross

    @classmethod
    def add_arguments(cls, ap: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=cls.SOURCES[f.name])

    @classmethod
    def from_args(cls, args) -> "Assumptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _expert_us(model, asm: Assumptions) -> float:
    """Time to stream one routed expert, us."""
    return model.expert_bytes / (asm.hbm_gbps * 1e3)


def _copy_us(model, D: int, asm: Assumptions, act_bytes: float) -> float:
    """Time for one token copy through the all-to-all, there (dispatch) and back (combine), us."""
    return model.layer.hidden_size * act_bytes * 2 / (asm.link_gbps(D) * 1e3)


def _saved_us(base: dict, r: dict, asm: Assumptions, act_bytes: float) -> tuple[float, float]:
    """(weights, all-to-all) us per MoE layer that row r saves against row base: the slowest
    rank's experts and the busiest rank's copies."""
    model = MODELS[r["model"]]
    return ((base["experts_slowest"] - r["experts_slowest"]) * _expert_us(model, asm),
            (base["busiest_rank_copies"] - r["busiest_rank_copies"]) * _copy_us(model, r["D"], asm, act_bytes))


def verdicts(rows: list[dict], asm: Assumptions, act_bytes: float) -> list[dict]:
    """Per (model, routing, B, D, setting): what the global set saves against SERE per rank,
    in us per MoE layer, and that minus its collective."""
    per_rank = {_key(r): r for r in rows if r["scope"] == "per_rank"}
    stock = {_key(r)[:4]: r for r in rows if r["scope"] == "stock"}
    out = []
    for r in (r for r in rows if r["scope"] == "global"):
        p = per_rank[_key(r)]
        weights_us, a2a_us = _saved_us(p, r, asm, act_bytes)
        coll = asm.collective_us(r["D"])
        out.append(dict(
            model=r["model"], routing=r["routing"], B=r["B"], D=r["D"], setting=r["setting"], rho=r["rho"],
            experts_saved=p["experts_slowest"] - r["experts_slowest"],
            weights_us=weights_us, a2a_us=a2a_us, collective_us=coll,
            net_weights_us=weights_us - coll, net_us=weights_us + a2a_us - coll,
            stock_weights_us=stock[_key(r)[:4]]["experts_slowest"] * _expert_us(MODELS[r["model"]], asm),
        ))
    return out


def sere_vs_stock(rows: list[dict], asm: Assumptions, act_bytes: float) -> list[dict]:
    """Per SERE row: what it saves against stock in us per MoE layer (the global set's
    collective subtracted), and stock's own time of the two terms (`stock_us`)."""
    stock = {_key(r)[:4]: r for r in rows if r["scope"] == "stock"}
    out = []
    for r in (r for r in rows if r["scope"] != "stock"):
        st, model = stock[_key(r)[:4]], MODELS[r["model"]]
        weights_us, a2a_us = _saved_us(st, r, asm, act_bytes)
        coll = asm.collective_us(r["D"]) if r["scope"] == "global" else 0.0
        stock_us = (st["experts_slowest"] * _expert_us(model, asm)
                    + st["busiest_rank_copies"] * _copy_us(model, r["D"], asm, act_bytes))
        out.append(dict(model=r["model"], routing=r["routing"], B=r["B"], D=r["D"], setting=r["setting"],
                        scope=r["scope"], weights_us=weights_us, a2a_us=a2a_us, net_us=weights_us + a2a_us - coll,
                        stock_us=stock_us))
    return out


def _key(r: dict) -> tuple:
    return (r["model"], r["routing"], r["B"], r["D"], r["setting"])


# --- findings ---------------------------------------------------------------------------


def _rng(xs, nd=2) -> str:
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.{nd}f} to {max(xs):.{nd}f}" if xs else "n/a"


def _cell(r: dict) -> str:
    return f"{r['model']}, {r['routing']}, B = {r['B']}, D = {r['D']}"


def _paying(vs: list[dict], key: str) -> list[str]:
    """One line per (model, routing, setting): the (B, D) cells where vs[key] > 0."""
    groups: dict[tuple, dict[int, list[int]]] = {}
    for v in vs:
        if v[key] > 0:
            groups.setdefault((v["model"], v["routing"], v["setting"]), {}).setdefault(v["B"], []).append(v["D"])
    lines = []
    for (model, routing, setting), cells in groups.items():
        best = max((v for v in vs if (v["model"], v["routing"], v["setting"]) == (model, routing, setting)),
                   key=lambda v: v[key])
        where = "; ".join(f"B = {B}: D = {', '.join(map(str, sorted(Ds)))}" for B, Ds in sorted(cells.items()))
        lines.append(f"{model}, {routing}, {setting}: {where} (best: B = {best['B']}, D = {best['D']}, "
                     f"{best['experts_saved']:.2f} experts fewer on the slowest rank, net {best[key]:+.1f} us per layer, "
                     f"{best[key] * MODELS[model].moe_layers / 1000:+.2f} ms per step)")
    return lines


def _where(items: list[dict]) -> str:
    """'B = 1: D = 2, 4; B = 16: D = 8' for the cells of `items`."""
    cells: dict[int, list[int]] = {}
    for x in items:
        cells.setdefault(x["B"], []).append(x["D"])
    return "; ".join(f"B = {B}: D = {', '.join(map(str, sorted(Ds)))}" for B, Ds in sorted(cells.items()))


def findings(rows: list[dict], vs: list[dict], sv: list[dict], asm: Assumptions) -> list[str]:
    """Bullet points computed from the rows, the global set's verdicts `vs` and SERE's against
    stock `sv`."""
    out = []
    key = {(_key(r), r["scope"]): r for r in rows}
    zero = [r for r in rows if r["scope"] == "global" and r["rho"] == 0]
    same = [g for g in zero if abs(g["experts_total"] - key[(_key(g), "per_rank")]["experts_total"]) < 1e-9
            and abs(g["experts_slowest"] - key[(_key(g), "per_rank")]["experts_slowest"]) < 1e-9]
    pays = [v for v in vs if v["net_weights_us"] > 0]
    if zero and len(same) == len(zero):
        a2a_pays = [v for v in vs if v["rho"] == 0 and v["net_us"] > 0]
        out.append(
            "**In short**: at rho = 0 a global primary set streams the same experts as per-rank sets (next point), so "
            "it cannot pay for its collective in weight bytes. It pays on weights only at rho > 0, "
            + (f"in {len(pays)} of {len(vs)} cells ({sum(v['D'] <= asm.gpus_per_node for v in pays)} within a node; "
               f"{sum(v['B'] == 1 for v in pays)} at B = 1; {sum(v['routing'].startswith('trace') for v in pays)} on "
               "the traces, whose CKA values are small enough for rho = 0.1 to leave critical experts), where a "
               "rank's few primaries leave critical experts that the union absorbs"
               if pays else "and nowhere in this sweep")
            + ". Its other effect is on the all-to-all: more copies in total, but a lighter busiest rank where many "
            f"tokens share a few popular primaries, which under the bandwidth model pays for the collective in "
            f"{len(a2a_pays)} cells at rho = 0. So the per-rank set is the right default; the global set is an option "
            "for rho > 0 at small per-rank batches, or where one rank's all-to-all sets the step (measure that "
            "first). At large D*B neither helps the slowest rank's weights, and SERE's all-to-all hot spots matter "
            "more than either.")
    out.append(
        f"**At rho = 0 a global primary set streams exactly the experts that per-rank primary sets stream** "
        f"({len(same)} of {len(zero)} cells with rho = 0 identical). This is a property, not sampling luck: when "
        "every secondary moves, a rank's tokens use only that rank's primaries, so the experts used over all ranks "
        "are the union of the per-rank primary sets, which is the global primary set. A global set can save "
        "weight bytes only where secondaries stay (rho > 0: critical experts that a rank's few primaries cannot "
        "absorb and the union can).")

    main = [r for r in rows if r["setting"] == MAIN and r["scope"] == "per_rank"]
    for name in MODELS:
        sel = [r for r in main if r["model"] == name]
        if not sel:
            continue
        parts = [f"B = {B}: {_rng(r['slowest_vs_stock'] for r in sel if r['B'] == B)}"
                 for B in sorted({r["B"] for r in sel})]
        out.append(f"{name}, {MAIN}, slowest-rank expert bytes relative to stock (range over routings and D): "
                   + "; ".join(parts) + ".")
    if main:
        sat = [r for r in main if r["slowest_vs_stock"] is not None and r["slowest_vs_stock"] >= 0.95]
        big = [r for r in main if r["D"] * r["B"] * MODELS[r["model"]].top_k >= 4 * MODELS[r["model"]].num_experts]
        big_sat = [r for r in big if r in sat]
        gap = max(main, key=lambda r: (r["slowest_vs_stock"] or 0) - (r["mean_vs_stock"] or 0))
        stock_imb = [r["experts_slowest"] / r["experts_per_rank_mean"] for r in rows
                     if r["scope"] == "stock" and r["experts_per_rank_mean"] > 0]
        sere_imb = [r["experts_slowest"] / r["experts_per_rank_mean"] for r in main if r["experts_per_rank_mean"] > 0]
        out.append(
            f"**Stragglers eat the saving at scale.** The slowest rank streams {_rng(stock_imb)}x the mean rank's "
            f"experts under stock routing and {_rng(sere_imb)}x under {MAIN} (all cells): SERE leaves a few ranks "
            f"with every one of their experts in use. Where the step routes at least 4 slots per expert "
            f"(D*B*k >= 4E), {len(big_sat)} of {len(big)} cells keep >= 95 % of stock's slowest-rank bytes. Widest "
            f"gap: {_cell(gap)}: the mean rank streams {gap['mean_vs_stock']:.2f} of stock, the slowest "
            f"{gap['slowest_vs_stock']:.2f}. With 2-4 experts per rank (D = 32-64) one rank whose experts are all "
            "some token's primary sets the step.")

    if main:
        small = [r for r in main if r["B"] == 1]
        up = max(main, key=lambda r: r["busiest_vs_stock"] or 0)
        out.append(
            f"All-to-all under {MAIN} per rank: at B = 1 a token's slots collapse onto its own top-1 expert, so "
            f"copies per token fall to {_rng(r['a2a_vs_stock'] for r in small)} of stock; over all cells total copies "
            f"are {_rng(r['a2a_vs_stock'] for r in main)} of stock. But the **busiest rank's** copies (max over "
            f"ranks of sent or received) reach up to {up['busiest_vs_stock']:.2f}x stock ({_cell(up)}): moved "
            "slots pile onto the ranks that own popular primaries.")

    sel = [x for x in sv if x["setting"] == MAIN and x["scope"] == "per_rank"]
    if sel:
        win = [x for x in sel if x["net_us"] > LOSS_SHARE * x["stock_us"]]
        lose = [x for x in sel if x["net_us"] < -LOSS_SHARE * x["stock_us"]]
        worst, best = min(sel, key=lambda x: x["net_us"]), max(sel, key=lambda x: x["net_us"])
        out.append(
            f"**Does SERE itself pay under EP?** Counting the slowest rank's weights at HBM speed and the busiest "
            f"rank's all-to-all at link speed (stock's per-layer time of the two = 100 %), {MAIN} per rank gains "
            f"more than {100 * LOSS_SHARE:.0f} % in {len(win)} of {len(sel)} cells (best: {_cell(best)}, "
            f"{best['net_us']:+.0f} us of {best['stock_us']:.0f} us per layer), loses more than that in {len(lose)} "
            f"(worst: {_cell(worst)}: weights {worst['weights_us']:+.0f} us, all-to-all {worst['a2a_us']:+.0f} us "
            f"of {worst['stock_us']:.0f} us per layer) and is within it in the rest. It loses where the slowest rank "
            "streams all its experts anyway and the moved slots make one rank's all-to-all heavier:")
        groups: dict[tuple, list[dict]] = {}
        for x in lose:
            groups.setdefault((x["model"], x["routing"]), []).append(x)
        out += [f"  - {m}, {r}: {_where(xs)}" for (m, r), xs in groups.items()]

    grouped = [r for r in main if r["routing"].startswith("grouped")]
    if grouped:
        worst = max(grouped, key=lambda r: r["a2a_vs_stock"] or 0)
        out.append(
            f"**SERE undoes DeepSeek-V3's group limit.** Under `{worst['routing']}` routing a token reaches at most "
            "4 groups (at D = 8, 4 ranks); a moved slot goes to the most similar primary wherever it lives, so "
            f"per-rank SERE sends up to {worst['a2a_vs_stock']:.2f}x stock's copies ({_cell(worst)}). A SERE for "
            "group-limited routers would restrict targets to the token's groups (not in the routing contract).")

    if zero:
        g1 = [r for r in zero if r["setting"] == MAIN]
        pr_of = {_key(r): key[(_key(r), "per_rank")] for r in g1}
        tot = [r["copies_per_token_rank"] / pr_of[_key(r)]["copies_per_token_rank"] for r in g1
               if pr_of[_key(r)]["copies_per_token_rank"] > 0]
        bus = [(r["busiest_rank_copies"] / pr_of[_key(r)]["busiest_rank_copies"], r) for r in g1
               if pr_of[_key(r)]["busiest_rank_copies"] > 0]
        lo, hi = min(bus, key=lambda t: t[0]), max(bus, key=lambda t: t[0])
        lighter = [r for x, r in bus if x < 0.95]
        heavier = [r for x, r in bus if x > 1.05]
        out.append(
            f"At {MAIN} the global set **changes only the all-to-all**: a moved slot goes to the most similar of all "
            f"ranks' primaries, not its own rank's. Total copies: {_rng(tot)}x those of SERE per rank (above 1 in "
            f"{sum(x > 1 for x in tot)} of {len(tot)} cells). Busiest rank: {lo[0]:.2f}x ({_cell(lo[1])}) to "
            f"{hi[0]:.2f}x ({_cell(hi[1])}); lighter (< 0.95x) in {len(lighter)} cells "
            f"(B in {{{', '.join(map(str, sorted({r['B'] for r in lighter})))}}}, routings "
            f"{', '.join(sorted({r['routing'] for r in lighter}))}), heavier (> 1.05x) in {len(heavier)} "
            f"(B in {{{', '.join(map(str, sorted({r['B'] for r in heavier})))}}}): a larger primary set spreads "
            "the piles that per-rank SERE builds where many tokens share a few popular primaries, and adds "
            "traffic where per-rank SERE had kept each token on one rank.")

    w = _paying(vs, "net_weights_us")
    out.append(
        f"**Where the global set pays for its collective** (weights only: slowest-rank bytes saved at "
        f"{asm.hbm_gbps / 1000:g} TB/s against {asm.collective_us_node:g} us within a node, D <= {asm.gpus_per_node}, "
        f"{asm.collective_us_cross:g} us across nodes): {len(pays)} of {len(vs)} (model, routing, B, D, setting) "
        f"cells, {sum(v['rho'] == 0 for v in pays)} of them at rho = 0"
        + (f"; all with D <= {max(v['D'] for v in pays)} and B <= {max(v['B'] for v in pays)}:" if pays else "."))
    out += [f"  - {line}" for line in w]
    a = [v for v in vs if v["net_us"] > 0]
    big_a2a = [v for v in vs if v["B"] >= 64]
    out.append(
        f"Counting the busiest rank's all-to-all change as bandwidth time too ({asm.link_gbps_node:g} / "
        f"{asm.link_gbps_cross:g} GB/s within / across nodes), {len(a)} of {len(vs)} cells pay, "
        f"{sum(v['rho'] == 0 for v in a)} of them at rho = 0 (there through a lighter busiest rank alone). At "
        f"B >= 64 that term spans {_rng((v['a2a_us'] for v in big_a2a), 0)} us per layer, against a collective of "
        f"{asm.collective_us_node:g}-{asm.collective_us_cross:g} us; at small B the all-to-all is latency-bound and "
        "the term says little. Per cell: `a2a us` in the tables.")
    return out


# --- markdown ----------------------------------------------------------------------------


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def _f(x, nd=2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _assumption_lines(rows: list[dict], meta: dict, asm: Assumptions) -> list[str]:
    act = meta["sweep"]["act_bytes"]
    sweep = meta["sweep"]
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "stock"]
    se = max((r["experts_slowest_se"] / r["experts_slowest"] for r in rows if r["experts_slowest"]), default=0)
    L = ["## What is modelled", "",
         "- **Layout**: data-parallel attention + expert parallelism, DP = EP = D ranks (D = "
         f"{', '.join(map(str, sweep['degrees']))}, divisors of E only). DP rank d decodes its own batch of B tokens "
         f"(B = {', '.join(map(str, sweep['batches']))}). Rank r owns experts [r E/D, (r+1) E/D) (vLLM's default "
         "linear placement; no redundant experts, no EPLB).",
         "- **Weights**: EP rank r streams each of its experts that some token of some DP rank is routed to, once "
         "per layer. The step's MoE weight time is the sum over layers of the slowest rank's bytes (each layer's "
         "all-to-all waits for the slowest rank). Only routed experts count: attention, dense layers and "
         "DeepSeek-V3's shared expert are the same in every setting here. `GB/step` = slowest rank's experts per "
         "layer x bytes per expert x MoE layers.",
         "- **SERE per rank** applies the routing contract to each DP rank's B tokens; **SERE global** to "
         "all D*B tokens at once, which is exactly a primary set equal to the union of every rank's top-S experts "
         "(what an all-reduce of an E-wide mask gives each rank). The collective is modelled as an all-reduce of "
         "E bytes (one byte per expert, SUM or MAX; E bits would cost the same: a message this small costs latency, "
         "not bandwidth), once per MoE layer, on the critical path (the mask is needed between router and dispatch). "
         "The contract runs as `sere.reroute` (torch backend) once per primary set on E pseudo-tokens [p, e], which "
         "gives each secondary expert's target; tests check it equals `sere.reroute` on the tokens themselves.",
         "- **All-to-all**: a (token, expert) pair travels when the expert's owner is not the token's DP rank. "
         "The counts shown are one hidden-state copy per token per distinct destination rank (DeepEP's normal "
         "kernels send a token to a rank once however many of its experts live there, so the duplicates SERE "
         "creates inside a token are free). The JSON also has one copy per distinct expert "
         "(`copies_per_token_expert`: DeepEP's low-latency kernels, a slot per (token, expert), SERE's duplicates "
         "collapsed) and one per slot (`copies_per_token_slot`, no dedupe). `busiest` = max over ranks of copies "
         "sent or received in dispatch; combine returns the same copies. Bytes per copy: hidden x "
         f"{act:g} B (bf16; DeepEP dispatches in fp8, which would halve the dispatch half).",
         "- **Settings**: stock; " + ", ".join(settings) + f", each per rank and global. {MAIN} is the main one "
         "(every secondary moves: every similarity used here is >= 0). At rho = 0 the expert *count* does not "
         "depend on the similarity; which primary, and so which rank, a moved slot lands on does, and with it the "
         "all-to-all.",
         f"- **Draws**: each (model, routing, B, D) cell averages {sweep['min_draws']}-{sweep['max_draws']} "
         f"independent layers (about {sweep['target_tokens']} tokens' worth; seeds 0..n-1; every setting of a cell "
         f"sees the same tokens). Largest standard error of the slowest rank's expert count: {100 * se:.1f} % of "
         "its mean.",
         "- **Not modelled**: expert compute (a rank that receives many tokens also computes more; decode MoE is "
         "weight-bound, so it counts as zero here), all-to-all latency (only its bandwidth term), overlap of "
         "communication with compute (two-batch overlap hides part of the all-to-all), everything outside the "
         "routed experts, redundant experts (EPLB), and what re-routing does to the model's output.", "",
         "### Model shapes", ""]
    L += _table(["model", "E", "top-k", "hidden", "moe_intermediate", "MoE layers / layers", "weights",
                 "MB per expert", "source"],
                [[m.name, m.num_experts, m.top_k, m.layer.hidden_size, m.layer.moe_intermediate_size,
                  f"{m.moe_layers} / {m.layers}", m.weight_dtype, _f(m.expert_bytes / 1e6, 1), m.source]
                 for m in MODELS.values()])
    L += ["", "Neither model is in `sere.harness.model_configs.REAL_MODELS` (whole transformers configs of the "
          "paper's three models); the sizes live in `bench/ep_model.py`, reusing its `LayerShapes`.", "",
          "### Routing", "",
          "- `uniform`: k distinct experts per token, uniformly (a random router; the pessimistic case for SERE).",
          "- `zipf:1.2`: popularity ~ rank^-1.2 over a seeded random ranking, a new ranking per layer. Heavily "
          "skewed: the top expert is in nearly every token's top-8, so its rank is the busiest all-to-all rank "
          "under every setting; trained models with load balancing are flatter.",
          "- `grouped:8/4` (DeepSeek-V3 only): the model's group limit (8 groups of 32 experts, 4 groups per token), "
          "uniform inside the chosen groups; `uniform` and `zipf` ignore the limit.",
          "- `trace`: the zoo's `qwen3_moe` routing trace (bench/traces/, a small model trained here: 128 experts, "
          "top-8, 3 layers of 1024 decode tokens) with its calibrated linear-CKA similarity, as recorded for "
          "Qwen3-235B-A22B's 128 experts. `trace x2` (DeepSeek-V3's 256) is a **construction, not a measurement**: "
          "expert e -> 2e + a fair coin per (token, slot); similarity between halves copied from their parents, "
          "between the two halves of one expert the row's mean off-diagonal value. Beyond 1024 tokens per layer "
          "rows repeat (fresh coins for x2).",
          "- uniform, zipf and grouped use `bench.routing.synthetic_similarity` (symmetric, uniform in [0, 1), a "
          "new matrix per layer): under it a threshold rho keeps a secondary critical with probability rho^|P|, "
          "so rho > 0 matters only where the primary set P is small (B = 1 per rank). The trace's CKA values are "
          "small (most rows' best match 0.05-0.3), so rho = 0.1 keeps many secondaries and rho = 0.5 nearly all.", "",
          "### Assumptions that turn counts into time (the global set's verdict)", ""]
    L += _table(["assumption", "value", "source / why"],
                [[k, v, Assumptions.SOURCES[k]] for k, v in asdict(asm).items()])
    L += ["", "Per MoE layer, the global set's gain over SERE per rank: `weights us` = (slowest rank's experts per "
          "rank - global) x bytes per expert / HBM bandwidth; `a2a us` = (busiest rank's copies per rank - global) "
          f"x hidden x {act:g} B x 2 (dispatch + combine) / link bandwidth; `net w us` = weights us - collective "
          "latency (the verdict of the Findings); `net us` adds a2a us. `weights us` is also the break-even: the "
          "collective latency below which the global set pays on weights. The all-to-all term is a bandwidth "
          "term; at small batches the all-to-all is latency-bound and the term overstates what copies cost "
          "either way.", ""]
    return L


def markdown(rows: list[dict], meta: dict, asm: Assumptions) -> str:
    vs = verdicts(rows, asm, meta["sweep"]["act_bytes"])
    sv = sere_vs_stock(rows, asm, meta["sweep"]["act_bytes"])
    svby = {(x["model"], x["routing"], x["B"], x["D"], x["setting"], x["scope"]): x for x in sv}
    by = {(_key(r), r["scope"]): r for r in rows}
    vby = {(v["model"], v["routing"], v["B"], v["D"], v["setting"]): v for v in vs}
    rho_settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "stock" and not s.endswith("rho=0")]
    L = ["# SERE under data-parallel attention + expert parallelism: a simulation (issue 15)", "",
         f"`python -m bench.ep_simulation --out bench/results` ({meta['seconds']:.0f} s on a 2-core CPU, "
         f"{meta.get('date', 'undated')}, torch {meta.get('torch', '?')}). Rows: "
         "`ep_simulation.json`; plot: `ep_simulation.png`. Counts from routing, converted to time under the stated "
         "assumptions; no GPU ran. Numbers are means over independent layers per cell. The findings below are "
         "generated from the rows.", "",
         "## Findings", ""]
    L += [f"- {f}" if not f.startswith("  - ") else f for f in findings(rows, vs, sv, asm)]
    L += [""] + _assumption_lines(rows, meta, asm)
    L += ["## Tables", "",
          f"**{MAIN}** per (model, routing): `stock exp` / `SERE exp` = experts the slowest EP rank streams per "
          "layer (SERE per rank and global are identical here); `/stock` = slowest-rank bytes, `mean /stock` = mean "
          "rank's; `GB/step` = slowest rank's routed-expert bytes per step, stock -> SERE; `a2a` = copies per token "
          "per layer, stock / per rank / global; `busiest` = busiest rank's copies per layer, stock / per rank / global; "
          "`vs stock us` = SERE's gain over stock per MoE layer (slowest-rank weights + busiest-rank all-to-all, "
          "minus the collective for global; terms as defined above), per rank / global.",
          "", "**Global vs per rank at rho > 0**: slowest rank's experts per rank / global, and the verdict terms "
          "defined above (us per MoE layer).", ""]
    for name in MODELS:
        for routing in dict.fromkeys(r["routing"] for r in rows if r["model"] == name):
            cells = sorted({(r["B"], r["D"]) for r in rows if r["model"] == name and r["routing"] == routing})
            main_body, rho_body = [], []
            for B, D in cells:
                k0 = (name, routing, B, D)
                st, p, g = by[(k0 + ("stock",), "stock")], by[(k0 + (MAIN,), "per_rank")], by[(k0 + (MAIN,), "global")]
                main_body.append([B, D, _f(st["experts_slowest"], 1), _f(p["experts_slowest"], 1),
                                  _f(p["slowest_vs_stock"]), _f(p["mean_vs_stock"]),
                                  f"{st['slowest_gb_step']:.1f} -> {p['slowest_gb_step']:.1f}",
                                  " / ".join(_f(x["copies_per_token_rank"]) for x in (st, p, g)),
                                  " / ".join(_f(x["busiest_rank_copies"], 0) for x in (st, p, g)),
                                  " / ".join(_f(svby[k0 + (MAIN, sc)]["net_us"], 0) for sc in ("per_rank", "global"))])
                row = [B, D]
                for s in rho_settings:
                    v = vby[k0 + (s,)]
                    row += [f"{by[(k0 + (s,), 'per_rank')]['experts_slowest']:.1f} / "
                            f"{by[(k0 + (s,), 'global')]['experts_slowest']:.1f}",
                            _f(v["weights_us"], 1), _f(v["net_weights_us"], 1), _f(v["a2a_us"], 1)]
                rho_body.append(row)
            L += [f"### {name}, {routing}", ""]
            L += _table(["B", "D", "stock exp", "SERE exp", "/stock", "mean /stock", "GB/step", "a2a", "busiest",
                         "vs stock us"],
                        main_body) + [""]
            header = ["B", "D"]
            for s in rho_settings:
                header += [f"{s} exp", "weights us", "net w us", "a2a us"]
            L += _table(header, rho_body) + [""]
    return "\n".join(L)


# --- plot --------------------------------------------------------------------------------


def plot(rows: list[dict], vs: list[dict], path: Path) -> Path:
    """One row of panels per (model, routing); x = D. Columns: slowest-rank bytes, total and
    busiest-rank all-to-all copies relative to stock (main setting), and the global set's net
    weights gain per layer at rho > 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["routing"]) for r in rows))
    rho_settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "stock" and not s.endswith("rho=0")]
    batches = sorted({r["B"] for r in rows})
    colors = dict(zip(batches, plt.cm.viridis([i / max(1, len(batches) - 1) * 0.85 for i in range(len(batches))])))
    cols = [("slowest_vs_stock", f"slowest-rank expert bytes / stock, {MAIN}"),
            ("a2a_vs_stock", f"all-to-all copies / stock, {MAIN}"),
            ("busiest_vs_stock", f"busiest rank's copies / stock, {MAIN}"),
            ("net_weights_us", "global set: weights saved - collective, us/layer")]
    fig, axes = plt.subplots(len(panels), len(cols), figsize=(3.6 * len(cols), 2.4 * len(panels)),
                             squeeze=False, sharex=True)
    for i, (model, routing) in enumerate(panels):
        for j, (metric, title) in enumerate(cols):
            ax = axes[i, j]
            for B in batches:
                if metric == "net_weights_us":  # solid / dashed: the rho > 0 settings
                    lines = [(s, ls, sorted((v for v in vs if (v["model"], v["routing"], v["B"], v["setting"])
                                             == (model, routing, B, s)), key=lambda v: v["D"]))
                             for s, ls in zip(rho_settings, ("-", "--", ":", "-."))]
                    for s, ls, sel in lines:
                        ax.plot([v["D"] for v in sel], [v[metric] for v in sel], ls, color=colors[B], marker=".",
                                label=f"B={B} {s}")
                    ax.axhline(0.0, color="grey", lw=0.6)
                    continue
                for scope, ls in (("per_rank", "-"), ("global", "--")):
                    sel = sorted((r for r in rows if (r["model"], r["routing"], r["B"], r["setting"], r["scope"])
                                  == (model, routing, B, MAIN, scope)), key=lambda r: r["D"])
                    ax.plot([r["D"] for r in sel], [r[metric] for r in sel], ls, color=colors[B], marker=".",
                            label=f"B={B} {scope.replace('_', ' ')}")
                ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["D"] for r in rows}), [str(d) for d in sorted({r["D"] for r in rows})])
            ax.set_title(f"{model}, {routing}\n{title}", fontsize=7)
            ax.tick_params(labelsize=7)
            if i == len(panels) - 1:
                ax.set_xlabel("EP degree D (= DP degree)", fontsize=7)
    axes[0, 0].legend(fontsize=5.5, ncol=2)
    axes[0, -1].legend(fontsize=5.5, ncol=2)
    fig.suptitle("SERE under DP attention + EP, simulated (solid: per-rank primary set, dashed: global)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def write_report(rows: list[dict], meta: dict, asm: Assumptions, out: Path) -> list[Path]:
    md = out / "ep_simulation.md"
    md.write_text(markdown(rows, meta, asm) + "\n")
    vs = verdicts(rows, asm, meta["sweep"]["act_bytes"])
    return [out / "ep_simulation.json", md, plot(rows, vs, out / "ep_simulation.png")]
