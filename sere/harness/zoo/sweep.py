"""Quality against activated experts on the zoo: SERE and the controls, written as a report.

    sere-accuracy-report --out bench/results --notes bench/results/accuracy_notes.md   # all zoo models
    sere-accuracy-report --models qwen2_moe --out /tmp/acc --zoo-dir tests/zoo
    (= python -m sere.harness.zoo.sweep; --out is required: the report's folder is never guessed;
    the zoo folder is --zoo-dir, else $SERE_ZOO_DIR, see sere.harness.zoo)

For each zoo model, on the committed held-out texts (sere.harness.fidelity; CPU, float32), with
batches composed by sere.harness.compositions (MIXED: four domains in every batch):
  1. methods at equal budget: SERE and random re-routing over S x threshold, top-S
     truncation, drop (truncate's slots get weight 0, not renormalised: sere.harness.methods.drop)
     and OEA over S, at batch size 16 (MIXED, 32 windows of 128 tokens); SERE with each other
     calibrated similarity at rho = 0 and the paper's S=2, rho=0.1; and, for a similarity
     that can be negative (substitution, in [-1, 1]), at rho = -1, where every secondary slot
     moves (the budget of CKA at rho = 0), with random re-routing at that same setting;
  2. batch size: SERE and random at the paper's settings (S=2, rho=0.1; S=1, rho=0) for
     B in 16 and 64 (MIXED, 64 windows);
  3. the spread of random re-routing: at the paper's settings and batch 16, random with
     RANDOM_SEEDS seeds (seed 0 is the "random" row of part 1), so that "SERE beats random" can
     be read against the spread of random draws, not against one draw; the same at rho = -1
     for the substitution similarity;
  4. compositions: at equal budget (S=1, every secondary slot moves) every similarity and
     RANDOM_SEEDS random draws on one-domain batches (kjv, pydoc, pycode, de), MIXED, and the
     minority case (one pycode request among 15 kjv requests; its own KL, row 0) next to the same
     request among 15 of its own domain;
  5. calibration-domain shift: SERE with CKA calibrated on the mix, on kjv only and on pycode only
     (similarity_cka_<domain>/), evaluated on one-domain batches of each of the four domains.
  6. grid: part 1's S x threshold grid (SERE, random) and controls in every other composition
     (batch 16; no greedy), so KL can be read against activated experts per composition;
  7. batch64: the controls and the random spread (RANDOM_SEEDS) at batch 64 (MIXED);
  8. batch64sim: every calibrated similarity at equal budget (S=1, every secondary slot moves)
     at batch 64 (MIXED), against part 7's random draws at the same budget.
`--parts grid,batch64` measures only those parts.
Writes accuracy.json (every row), accuracy.md (tables, the claim check, where SERE stands)
and accuracy.png (KL and top-1 agreement against activated experts, one column per model); for
an upcycled model also whether its similarity artifacts see which experts share a dense origin.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sere.harness import compositions as comp
from sere.harness.fidelity import Composition, fidelity, reference_pass
from sere.harness.settings import SERE_S1, SERE_S2
from sere.harness.zoo import ZOO_MODELS, ZooDirNotSet, heldout_ids, load_zoo_model, model_dir, zoo_dir

THRESHOLDS = (0.0, 0.1, 0.3, 0.5)
PAPER_SETTINGS = (SERE_S2, SERE_S1)  # (S, rho) each; S=2 first, the order of the report's rows
BATCH_SIZES = (16, 64)
MAIN_BATCH = 16
SEQ_LEN, NUM_WINDOWS = 128, 64
MAIN_WINDOWS = 32  # at MAIN_BATCH: two batches per setting (the 12k vocabulary makes each pass costly on a CPU)
MIXED_DOMAINS = ["kjv", "pydoc", "pycode", "de"]
MINORITY, MAJORITY = "pycode", "kjv"
ALL_MOVE = (1, -1e9)  # S=1, a threshold below every similarity: every secondary slot moves (equal budget)
SHIFT_VARIANTS = ("cka_kjv", "cka_pycode")
CONTROLS = ("truncate", "drop", "oea")
# Similarities with values in [-1, 1] (calibration/substitution.py): at rho = -1 every secondary
# slot moves, the equal-budget setting (CKA's values are >= 0, so for it that is rho = 0).
ALL_MOVE_RHO = {"substitution": -1.0}
RANDOM_SEEDS = 8


def primary_slots(k: int) -> tuple[int, ...]:
    """S values swept for top-k routing: 1 and 2 (below k)."""
    return tuple(s for s in (1, 2) if s < k)


def composed(pool, kind: str, B: int, n: int) -> torch.Tensor:
    """[n, B, L] batches of composition `kind`: "mixed", "minority", "minority_alone" or
    "domain:<name>" (see sere.harness.compositions)."""
    if kind == "mixed":
        return comp.mixed(pool, MIXED_DOMAINS, B, n)
    if kind == "minority":
        return comp.minority(pool, MINORITY, MAJORITY, B, n)
    if kind == "minority_alone":
        return comp.minority_alone(pool, MINORITY, B, n)
    if kind.startswith("domain:"):
        return comp.one_domain(pool, kind.split(":", 1)[1], B, n)
    raise ValueError(f"unknown composition {kind!r}")


COMPOSITIONS = ("mixed", "minority", "minority_alone", *(f"domain:{d}" for d in MIXED_DOMAINS))


def similarity_variants(name: str, zoo=None) -> dict[str, Path]:
    """label -> artifact: "sere" is the committed default (<zoo>/<name>/, linear CKA);
    "sere[<metric>]" for each other calibration in <zoo>/<name>/similarity_<metric>/."""
    d = model_dir(name, zoo)
    out = {"sere": d / "sere_similarity.safetensors"}
    for sub in sorted(d.glob("similarity_*/sere_similarity.safetensors")):
        metric = sub.parent.name.removeprefix("similarity_")
        if metric not in SHIFT_VARIANTS:  # the one-domain calibrations belong to part 5 only
            out[f"sere[{metric}]"] = sub
    return out


def sweep_model(name: str, *, batch_sizes=BATCH_SIZES, thresholds=THRESHOLDS, seq_len=SEQ_LEN, num_windows=NUM_WINDOWS,
                random_seeds=RANDOM_SEEDS, zoo=None, parts=None):
    """All rows for one zoo model: dicts of Fidelity fields plus model, part, stock experts
    and the similarity artifact used (method "sere[frobenius]" = SERE with that artifact).
    zoo: the zoo folder (None: $SERE_ZOO_DIR, see sere.harness.zoo.zoo_dir). parts: measure
    only the rows of these parts (None: all)."""
    model, tok = load_zoo_model(name, zoo_dir=zoo)
    domains = sorted({*MIXED_DOMAINS, MINORITY, MAJORITY})
    pool = comp.window_pool({d: heldout_ids(tok, zoo, domain=d) for d in domains}, seq_len)
    sims = similarity_variants(name, zoo)
    default = sims["sere"]
    k = model.config.num_experts_per_tok
    jobs = []  # (part, B, label, method, S, rho, artifact[, method options]); method "drop": see _measure
    for S in primary_slots(k):
        for rho in thresholds:
            jobs += [("methods", MAIN_BATCH, "sere", "sere", S, rho, default),
                     ("methods", MAIN_BATCH, "random", "random", S, rho, default)]
        jobs += [("methods", MAIN_BATCH, c, c, S, 0.0, default) for c in CONTROLS]
        for label, path in sims.items():
            if label != "sere":  # other metrics: their threshold scales differ, so rho = 0 and the paper's
                jobs += [("methods", MAIN_BATCH, label, "sere", S, 0.0, path)]
    for label, path in sims.items():
        if label != "sere" and (2, 0.1) in PAPER_SETTINGS and 2 < k:
            jobs += [("methods", MAIN_BATCH, label, "sere", 2, 0.1, path)]
    for metric, rho in ALL_MOVE_RHO.items():
        path = sims.get(f"sere[{metric}]")
        if path is None:
            continue
        for S in sorted({S for S, _ in PAPER_SETTINGS if 0 < S < k}, reverse=True):
            jobs += [("methods", MAIN_BATCH, f"sere[{metric}]", "sere", S, rho, path),
                     ("methods", MAIN_BATCH, f"random[{metric}]", "random", S, rho, path)]
            jobs += [("seeds", MAIN_BATCH, f"random[{metric}]", "random", S, rho, path, {"seed": seed})
                     for seed in range(1, random_seeds)]
    for B in batch_sizes:
        for S, rho in PAPER_SETTINGS:
            jobs += [("batch", B, "sere", "sere", S, rho, default), ("batch", B, "random", "random", S, rho, default)]
    for S, rho in PAPER_SETTINGS:
        jobs += [("seeds", MAIN_BATCH, "random", "random", S, rho, default, {"seed": seed}) for seed in range(1, random_seeds)]
    jobs = [("mixed", *j) for j in jobs]
    for kind in COMPOSITIONS:  # part 4: equal budget, every similarity and the random draws
        jobs += [(kind, "compositions", MAIN_BATCH, label, "sere", *ALL_MOVE, path) for label, path in sims.items()]
        jobs += [(kind, "compositions", MAIN_BATCH, "random", "random", *ALL_MOVE, default, {"seed": seed})
                 for seed in range(random_seeds)]
    d = model_dir(name, zoo)
    shift = {"sere": default, **{f"sere[{v}]": d / f"similarity_{v}" / "sere_similarity.safetensors" for v in SHIFT_VARIANTS}}
    for kind in (f"domain:{x}" for x in MIXED_DOMAINS):  # part 5: calibration-domain shift
        jobs += [(kind, "shift", MAIN_BATCH, label, "sere", S, rho, path) for label, path in shift.items() if path.exists()
                 for S, rho in (ALL_MOVE, SERE_S2)]
    for kind in COMPOSITIONS:  # part 6 ("grid"): part 1's grid and controls in every other composition
        if kind == "mixed":
            continue
        for S in primary_slots(k):
            for rho in thresholds:
                jobs += [(kind, "grid", MAIN_BATCH, m, m, S, rho, default) for m in ("sere", "random")]
            jobs += [(kind, "grid", MAIN_BATCH, c, c, S, 0.0, default) for c in CONTROLS]
    for S in primary_slots(k):  # part 7 ("batch64"): the controls and the random spread at batch 64 too
        jobs += [("mixed", "batch64", 64, c, c, S, 0.0, default) for c in CONTROLS]
    for S, rho in PAPER_SETTINGS:
        jobs += [("mixed", "batch64", 64, "random", "random", S, rho, default, {"seed": seed})
                 for seed in range(1, random_seeds)]
    # part 8 ("batch64sim"): every similarity at equal budget at batch 64 too
    jobs += [("mixed", "batch64sim", 64, label, "sere", *ALL_MOVE, path) for label, path in sims.items()]
    if parts is not None:
        jobs = [j for j in jobs if j[1] in parts]
    refs, rows = {}, []
    for kind, part, B, label, method, S, rho, sim, *opts in tqdm(jobs, desc=f"sweep {name}", unit="setting"):
        windows = MAIN_WINDOWS if B == MAIN_BATCH else num_windows
        if (kind, B) not in refs:
            refs[kind, B] = reference_pass(model, composed(pool, kind, B, windows // B), Composition(B, seq_len, windows))
        options = opts[0] if opts else None
        m = _measure(model, refs[kind, B], sim, S, rho, method, options, greedy=part == "methods")
        rows.append({"model": name, "part": part, "composition": kind, "stock_experts": refs[kind, B].experts,
                     **m.as_dict(), "method": label, "similarity": str(Path(sim).relative_to(model_dir(name, zoo).parent)),
                     **({"seed": options["seed"]} if options else {})})
    return rows


def _measure(model, ref, sim, S: int, rho: float, method: str, options, greedy: bool = True):
    """fidelity() of one setting; "drop" = router weights zeroed by sere.harness.methods.dropping_weights
    while the truncate transform folds the same slots' ids (so experts per step are truncate's)."""
    if method == "drop":
        from sere.harness.methods import dropping_weights

        with dropping_weights(model, S):
            return fidelity(model, ref, sim, select_top_k=S, threshold=rho, method="truncate", greedy=greedy)
    return fidelity(model, ref, sim, select_top_k=S, threshold=rho, method=method, method_options=options, greedy=greedy)


def shared_origin_rows(name: str, zoo=None) -> list[dict]:
    """For an upcycled zoo model (its train_log has "upcycle"): per similarity artifact and MoE
    layer, does the similarity see which experts are copies of the same dense shard (expert e
    is shard e mod n)? Mean similarity to same-shard and to other experts, and the share of
    experts whose most similar other expert is a same-shard copy (chance: (c - 1) / (E - 1)
    for c copies of each shard). Computed from the committed artifacts; [] for other models."""
    from sere.artifact import load_similarity
    from transformers import AutoConfig

    log = json.loads((model_dir(name, zoo) / "train_log.json").read_text())
    if "upcycle" not in log:
        return []
    n = log["upcycle"]["n_shards"]
    cfg = AutoConfig.from_pretrained(model_dir(name, zoo))
    out = []
    for label, path in similarity_variants(name, zoo).items():
        for layer, sim in sorted(load_similarity(path, config=cfg).matrices.items()):
            sim = sim.float()  # E, E
            E = sim.shape[0]
            e = torch.arange(E)
            same = (e[:, None] % n) == (e[None, :] % n)  # E, E
            off = ~torch.eye(E, dtype=torch.bool)
            nearest = sim.masked_fill(~off, -float("inf")).argmax(1)  # E
            out.append({"model": name, "similarity": label, "layer": layer,
                        "same_shard_mean": float(sim[same & off].mean()), "other_mean": float(sim[~same].mean()),
                        "nearest_same_shard": float((nearest % n == e % n).float().mean()),
                        "chance": (E // n - 1) / (E - 1)})
    return out


# ---- report ---------------------------------------------------------------------------------


def _fmt_row(r) -> str:
    return (f"| {r['method']} | {r['select_top_k']} | {r['threshold']:g} | {r['experts_after']:.2f} / {r['stock_experts']:.2f} "
            f"| {r['kl']:.4f} | {r['top1_agreement']:.4f} | {r['ppl_ratio']:.4f} | {r['match_length']:.2f} |")


_HEADER = ("| method | S | rho | experts per step (of stock) | KL | top-1 agree | ppl ratio | greedy match |\n"
           "|---|---:|---:|---:|---:|---:|---:|---:|")


def _metric_of(label: str) -> str | None:
    """"sere[substitution]" -> "substitution"; "sere" / "random" -> None (the default, CKA)."""
    return label[label.index("[") + 1 : -1] if "[" in label else None


def claim_settings(rows) -> list[tuple[int, float, str | None]]:
    """(S, rho, metric) of each claim comparison: the paper's settings with the default
    artifact's random draws (metric None), and each ALL_MOVE_RHO metric at its rho."""
    out = [(S, rho, None) for S, rho in PAPER_SETTINGS]
    for metric, rho in ALL_MOVE_RHO.items():
        out += sorted({(r["select_top_k"], rho, metric) for r in rows
                       if r["method"] == f"random[{metric}]" and r["threshold"] == rho}, reverse=True)
    return out


def claim_rows(rows) -> list[dict]:
    """Per model, claim setting and SERE similarity (at the main batch size): SERE vs random
    re-routing on KL and top-1 agreement. At the paper's settings every similarity is compared
    with random re-routing of the default artifact's moved slots, except those of ALL_MOVE_RHO
    (at rho >= 0 they move almost nothing: no equal budget); those are compared at their rho
    with random re-routing of their own moved slots."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for S, rho, metric in claim_settings(rows):
            pick = {r["method"]: r for r in rows if r["model"] == name and r["part"] == "methods"
                    and r["select_top_k"] == S and r["threshold"] == rho}
            rnd = "random" if metric is None else f"random[{metric}]"
            x = pick.get(rnd)
            draws = [x] + [r for r in rows if r["model"] == name and r["part"] == "seeds" and r["method"] == rnd
                           and r["select_top_k"] == S and r["threshold"] == rho] if x else []
            for label, s in pick.items():
                if x is None or not label.startswith("sere"):
                    continue
                if metric is None and _metric_of(label) in ALL_MOVE_RHO or metric is not None and _metric_of(label) != metric:
                    continue
                kls, top1s = [d["kl"] for d in draws], [d["top1_agreement"] for d in draws]
                out.append({"model": name, "method": label, "S": S, "rho": rho, "sere_kl": s["kl"], "random_kl": x["kl"],
                            "sere_top1": s["top1_agreement"], "random_top1": x["top1_agreement"],
                            "sere_experts": s["experts_after"], "random_experts": x["experts_after"],
                            "holds": s["kl"] < x["kl"] and s["top1_agreement"] > x["top1_agreement"],
                            "seeds": len(draws), "random_kl_range": (min(kls), max(kls)),
                            "random_top1_range": (min(top1s), max(top1s)),
                            "beats_every_seed": s["kl"] < min(kls) and s["top1_agreement"] > max(top1s)})
    return out


def equal_budget_rows(rows, name: str, S: int) -> list[dict]:
    """The batch-16 rows of `name` at S that keep exactly the primary experts: rho = 0 for the
    default and other metrics, ALL_MOVE_RHO's rho for those metrics (not their rho = 0 rows),
    the controls (rho-free); random[<metric>] rows left out (the same moved slots as random)."""
    out = []
    for r in rows:
        if r["model"] != name or r["part"] != "methods" or r["select_top_k"] != S:
            continue
        metric = _metric_of(r["method"])
        if r["method"].startswith("random[") or r["threshold"] != ALL_MOVE_RHO.get(metric, 0.0):
            continue
        out.append(r)
    return out


def _label(r) -> str:
    return f"{r['method']} (rho={r['threshold']:g})" if r["threshold"] != 0.0 else r["method"]


def standing(rows) -> list[str]:
    """At equal budget (the same primary set, so the same experts per step): the rank of each
    method's KL among SERE (each similarity), random, truncate, drop and oea, per model and S."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for S in sorted({r["select_top_k"] for r in rows if r["model"] == name}):
            cands = equal_budget_rows(rows, name, S)
            if len(cands) < 4:
                continue
            ranked = sorted(cands, key=lambda r: r["kl"])
            order = " < ".join(f"{_label(r)} {r['kl']:.4f}" for r in ranked)
            spread = max(r["experts_after"] for r in cands) - min(r["experts_after"] for r in cands)
            lines.append(f"- {name}, S={S}: KL {order} (experts per step {cands[0]['experts_after']:.2f}, "
                         f"equal within {spread:.2f})")
    return lines


def _all_move_draws(rows, name: str, S: int) -> list[dict]:
    """Random re-routing draws (batch 16) that move every secondary slot: random[<metric>] at
    its ALL_MOVE_RHO over all seeds if measured, else the default artifact's rho = 0 ones."""
    for metric, rho in ALL_MOVE_RHO.items():
        draws = [r for r in rows if r["model"] == name and r["method"] == f"random[{metric}]" and r["select_top_k"] == S
                 and r["threshold"] == rho and r["part"] in ("methods", "seeds")]
        if draws:
            return draws
    return [r for r in rows if r["model"] == name and r["method"] == "random" and r["select_top_k"] == S
            and r["threshold"] == 0.0 and r["part"] in ("methods", "seeds")]


def drop_rows(rows) -> list[dict]:
    """Per model and S where drop was measured (batch 16): drop against truncate, OEA, SERE
    (default similarity at rho = 0, each ALL_MOVE_RHO similarity at its rho) and the spread of
    random re-routing of every secondary slot (_all_move_draws): all at the same budget."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for S in sorted({r["select_top_k"] for r in rows if r["model"] == name and r["method"] == "drop"}):
            pick = {r["method"]: r for r in equal_budget_rows(rows, name, S)}
            d, t = pick.get("drop"), pick.get("truncate")
            if d is None or t is None:
                continue
            draws = _all_move_draws(rows, name, S)
            out.append({"model": name, "S": S, "drop": d, "truncate": t, "oea": pick.get("oea"), "sere": pick.get("sere"),
                        "all_move": {m: pick[f"sere[{m}]"] for m in ALL_MOVE_RHO if f"sere[{m}]" in pick},
                        "random_seeds": len(draws),
                        "random_kl_range": (min(r["kl"] for r in draws), max(r["kl"] for r in draws)) if draws else None,
                        "random_top1_range": (min(r["top1_agreement"] for r in draws), max(r["top1_agreement"] for r in draws))
                        if draws else None})
    return out


def _kl_of(r) -> float:
    """The composition's headline KL: the minority request's own (row 0) in the minority cases."""
    return r["kl_by_row"][0] if r["composition"].startswith("minority") else r["kl"]


def composition_rows(rows) -> list[dict]:
    """Per model and composition (part 4): each similarity's KL, the random draws' range, and
    whether the best similarity / CKA beat every draw."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for kind in COMPOSITIONS:
            mine = [r for r in rows if r["model"] == name and r["part"] == "compositions" and r["composition"] == kind]
            if not mine:
                continue
            sims = {r["method"]: r for r in mine if r["method"].startswith("sere")}
            draws = [_kl_of(r) for r in mine if r["method"] == "random"]
            best = min(sims, key=lambda m: _kl_of(sims[m]))
            out.append({"model": name, "composition": kind, "stock_experts": mine[0]["stock_experts"],
                        "experts": sims["sere"]["experts_after"], "kl": {m: _kl_of(r) for m, r in sims.items()},
                        "top1": {m: (r["top1_by_row"][0] if kind.startswith("minority") else r["top1_agreement"])
                                 for m, r in sims.items()},
                        "random_kl": (min(draws), max(draws)), "seeds": len(draws), "best": best,
                        "best_beats_all": _kl_of(sims[best]) < min(draws), "cka_beats_all": _kl_of(sims["sere"]) < min(draws)})
    return out


def _composition_section(rows) -> list[str]:
    crow = composition_rows(rows)
    if not crow:
        return []
    sims = sorted({m for c in crow for m in c["kl"]}, key=lambda m: (m != "sere", m))
    lines = ["\n## Batch compositions at equal budget (S=1, every secondary slot moves, batch 16)\n",
             "KL per similarity (sere = linear CKA, the default) and the min-max of random re-routing over "
             f"{crow[0]['seeds']} seeds; minority = one {MINORITY} request among 15 {MAJORITY} requests, its own KL (row 0); "
             f"minority_alone = the same request among 15 {MINORITY} requests. experts = distinct experts per decode step "
             "and layer, SERE / stock. ![KL by composition](accuracy_compositions.png)\n",
             "| model | composition | experts | " + " | ".join(f"KL {m}" for m in sims) + " | KL random | best beats all | CKA beats all |",
             "|---|---|---:|" + "---:|" * len(sims) + "---|---|---|"]
    for c in crow:
        lo, hi = c["random_kl"]
        lines.append(f"| {c['model']} | {c['composition']} | {c['experts']:.2f} / {c['stock_experts']:.2f} | "
                     + " | ".join(f"{c['kl'].get(m, float('nan')):.4f}" for m in sims)
                     + f" | {lo:.4f}-{hi:.4f} | {'yes (' + c['best'] + ')' if c['best_beats_all'] else 'NO'} | "
                     f"{'yes' if c['cka_beats_all'] else 'no'} |")
    n = len(crow)
    lines.append(f"\nCounted over the {n} model x composition cases: the best similarity beats every random draw in "
                 f"{sum(c['best_beats_all'] for c in crow)}, CKA in {sum(c['cka_beats_all'] for c in crow)}.")
    pairs = [(a, b) for a in crow for b in crow if a["model"] == b["model"] and a["composition"] == "minority"
             and b["composition"] == "minority_alone"]
    if pairs:
        lines.append("\nThe minority request's own KL with SERE (CKA), among another domain's requests vs among its own: "
                     + "; ".join(f"{a['model']} {a['kl']['sere']:.4f} vs {b['kl']['sere']:.4f}" for a, b in pairs) + ".")
    return lines


def _shift_section(rows) -> list[str]:
    mine = [r for r in rows if r["part"] == "shift"]
    if not mine:
        return []
    labels = list(dict.fromkeys(r["method"] for r in mine))
    lines = ["\n## Calibration-domain shift (batch 16, one-domain batches)\n",
             "SERE with linear CKA calibrated on the multi-domain mix (sere), on King James text only (sere[cka_kjv]) "
             "and on Python code only (sere[cka_pycode]), evaluated on batches of one held-out domain each. KL; the "
             "lowest per row in bold.\n",
             "| model | evaluated on | S | rho | " + " | ".join(labels) + " |", "|---|---|---:|---:|" + "---:|" * len(labels)]
    for name in dict.fromkeys(r["model"] for r in mine):
        for kind in dict.fromkeys(r["composition"] for r in mine if r["model"] == name):
            for S, rho in sorted({(r["select_top_k"], r["threshold"]) for r in mine if r["model"] == name}):
                got = {r["method"]: r["kl"] for r in mine if r["model"] == name and r["composition"] == kind
                       and r["select_top_k"] == S and r["threshold"] == rho}
                lo = min(got.values())
                cells = [(f"**{got[m]:.4f}**" if got[m] == lo else f"{got[m]:.4f}") if m in got else "-" for m in labels]
                rho_s = "all move" if rho < -1e8 else f"{rho:g}"
                lines.append(f"| {name} | {kind.split(':', 1)[1]} | {S} | {rho_s} | " + " | ".join(cells) + " |")
    return lines


def _grid_rows(rows, name: str, kind: str) -> list[dict]:
    """Batch-16 rows of the S x rho grid and controls in composition `kind` (MIXED: part 1's)."""
    part = "methods" if kind == "mixed" else "grid"
    return [r for r in rows if r["model"] == name and r["part"] == part and r["composition"] == kind
            and r["method"] in ("sere", "random", *CONTROLS)]


def _grid_section(rows) -> list[str]:
    if not any(r["part"] == "grid" for r in rows):
        return []
    lines = ["\n## Every composition at equal budget: SERE, random, truncate, drop, OEA (batch 16, S = 1, rho = 0)\n",
             "The same methods in every composition (KL; minority rows: the minority request's own). The whole S x rho "
             "grid of each composition is in accuracy.json and drawn in ![KL against activated experts per composition]"
             "(accuracy_grid.png).\n",
             "| model | composition | experts (SERE / stock) | " + " | ".join(f"KL {m}" for m in ("sere", "random", *CONTROLS)) + " |",
             "|---|---|---:|" + "---:|" * (2 + len(CONTROLS))]
    for name in dict.fromkeys(r["model"] for r in rows):
        for kind in COMPOSITIONS:
            got = {r["method"]: r for r in _grid_rows(rows, name, kind) if r["select_top_k"] == 1 and r["threshold"] == 0.0}
            if "sere" not in got:
                continue
            cells = [f"{_kl_of(got[m]):.4f}" if m in got else "-" for m in ("sere", "random", *CONTROLS)]
            lines.append(f"| {name} | {kind} | {got['sere']['experts_after']:.2f} / {got['sere']['stock_experts']:.2f} | "
                         + " | ".join(cells) + " |")
    return lines


def _batch64_section(rows) -> list[str]:
    mine = [r for r in rows if r["part"] in ("batch", "batch64") and r["batch_size"] == 64]
    if not any(r["part"] == "batch64" for r in mine):
        return []
    lines = ["\n## Batch 64 (MIXED): the controls and the spread of random re-routing\n",
             "| model | S | rho | method | experts per step (of stock) | KL | top-1 agree |", "|---|---:|---:|---|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in mine):
        for S, rho in sorted({(r["select_top_k"], r["threshold"]) for r in mine if r["model"] == name}, reverse=True):
            pick = [r for r in mine if r["model"] == name and r["select_top_k"] == S and r["threshold"] == rho]
            for method in ("sere", *CONTROLS):
                for r in (x for x in pick if x["method"] == method):
                    lines.append(f"| {name} | {S} | {rho:g} | {method} | {r['experts_after']:.2f} / {r['stock_experts']:.2f} | "
                                 f"{r['kl']:.4f} | {r['top1_agreement']:.4f} |")
            draws = [r for r in pick if r["method"] == "random"]
            if draws:
                kls = [r["kl"] for r in draws]
                lines.append(f"| {name} | {S} | {rho:g} | random ({len(draws)} seeds) | {draws[0]['experts_after']:.2f} / "
                             f"{draws[0]['stock_experts']:.2f} | {min(kls):.4f}-{max(kls):.4f} | - |")
    return lines


def _batch64_similarity_section(rows) -> list[str]:
    """Part 8: each similarity at equal budget at batch 64 against the random draws of that budget
    (S = 1, rho = 0 with the default CKA artifact, whose values are >= 0: every secondary slot moves)."""
    sims = [r for r in rows if r["part"] == "batch64sim"]
    if not sims:
        return []
    lines = ["\n## Batch 64 (MIXED), equal budget: every similarity against random re-routing\n",
             "S = 1 and a threshold below every similarity, so every secondary slot moves and every row activates "
             "the same experts as random re-routing at S = 1, rho = 0 with CKA (values >= 0: all slots move; seed 0 "
             "from the batch-size part, seeds 1-7 from the batch-64 part).\n",
             "| model | similarity | experts per step (of stock) | KL | KL random (range) | beats every draw | top-1 agree |",
             "|---|---|---:|---:|---:|---|---:|"]
    for name in dict.fromkeys(r["model"] for r in sims):
        draws = [r["kl"] for r in rows if r["model"] == name and r["batch_size"] == 64 and r["method"] == "random"
                 and r["part"] in ("batch", "batch64") and r["select_top_k"] == 1 and r["threshold"] == 0]
        span = f"{min(draws):.4f}-{max(draws):.4f} ({len(draws)})" if draws else "-"
        for r in (x for x in sims if x["model"] == name):
            label = "sere[cka]" if r["method"] == "sere" else r["method"]
            beats = ("yes" if r["kl"] < min(draws) else "no") if draws else "-"
            lines.append(f"| {name} | {label} | {r['experts_after']:.2f} / {r['stock_experts']:.2f} | {r['kl']:.4f} | "
                         f"{span} | {beats} | {r['top1_agreement']:.4f} |")
    return lines


def write_grid_plot(rows, path: Path) -> None:
    """KL against activated experts, one panel per model (column) and composition (row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r["part"] == "grid" for r in rows):
        return
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(COMPOSITIONS), len(names), figsize=(4.2 * len(names), 3.0 * len(COMPOSITIONS)), squeeze=False)
    style = {"sere": ("C0", "o"), "random": ("C3", "x"), "truncate": ("C2", "s"), "drop": ("C7", "P"), "oea": ("C1", "^")}
    for j, name in enumerate(names):
        for i, kind in enumerate(COMPOSITIONS):
            ax, mine = axes[i][j], _grid_rows(rows, name, kind)
            for method, (color, marker) in style.items():
                for n, S in enumerate(sorted({r["select_top_k"] for r in mine if r["method"] == method})):
                    pts = sorted((r["experts_after"], _kl_of(r)) for r in mine if r["method"] == method
                                 and r["select_top_k"] == S and _kl_of(r) > 0)
                    if pts:
                        ax.plot(*zip(*pts), marker=marker, color=color, linewidth=1, markersize=4,
                                linestyle="-" if method in ("sere", "random") else ":", label=None if n else method)
            if mine:
                ax.axvline(mine[0]["stock_experts"], color="gray", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")
            ax.set_title(f"{name}: {kind}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(COMPOSITIONS) - 1:
                ax.set_xlabel("activated experts per step and layer")
            if j == 0:
                ax.set_ylabel("KL (minority: its own)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_composition_plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crow = composition_rows(rows)
    names = list(dict.fromkeys(c["model"] for c in crow))
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0][j]
        mine = [c for c in crow if c["model"] == name]
        x = range(len(mine))
        for lbl, marker in (("sere", "o"), ("sere[cosine]", "v"), ("sere[frobenius]", "D"), ("sere[substitution]", "*")):
            ys = [c["kl"].get(lbl, float("nan")) for c in mine]
            ax.plot(x, ys, marker=marker, linestyle="", label="sere (CKA)" if lbl == "sere" else lbl)
        ax.vlines(list(x), [c["random_kl"][0] for c in mine], [c["random_kl"][1] for c in mine], color="C3", linewidth=4,
                  alpha=0.5, label=f"random ({mine[0]['seeds']} seeds)")
        ax.set_xticks(list(x), [c["composition"].replace("domain:", "") for c in mine], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("KL(stock || re-routed), nats (minority: its own)")
        ax.set_title(f"{name}: S=1, every secondary moves")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(rows, path: Path, meta: dict, notes: str = "", zoo=None) -> None:
    parts = [f"# Accuracy of SERE and the controls on the zoo models\n\nGenerated by `{meta['command']}` on "
             f"{meta['date']} ({meta['machine']}, torch {meta['torch']}, float32, CPU; {meta['minutes']:.1f} min). "
             "Do not edit by hand; the findings come from accuracy_notes.md (`--notes`), re-render with `--from-json`.\n",
             "Every number compares a re-routed model with the unmodified model on the committed held-out "
             f"texts (tests/zoo/heldout/; windows of {SEQ_LEN} tokens, {MAIN_WINDOWS} at batch {MAIN_BATCH}, {NUM_WINDOWS} "
             f"at batch 64; unless a section says otherwise the batches are MIXED: four of each of {', '.join(MIXED_DOMAINS)} "
             "in every decode step, see sere/harness/compositions.py and sere/harness/fidelity.py). KL = mean KL(stock || re-routed) of the next-token "
             "distributions (nats); top-1 agree = share of positions where both pick the same next token; "
             "ppl ratio = re-routed / stock held-out perplexity; greedy match = leading greedy tokens (of 32) "
             "equal to the stock model's after a 16-token prompt; experts per step = distinct experts per "
             "decode step and MoE layer, mean (the stock model's count after the slash). random = the slots "
             "SERE moves, sent to a random primary expert (same experts per step as SERE); truncate = top-S "
             "routing (a removed slot's weight goes to the token's top expert: renormalised top-S); drop = the same "
             "slots removed with their weight set to 0 and not renormalised (the token goes without those experts' "
             "contribution; sere.harness.methods.drop, measured with truncate's ids and the weights zeroed by "
             "sere.harness.methods.dropping_weights, so the same experts per step as truncate); oea = Opportunistic Expert "
             "Activation (keep top-S plus secondaries the batch already loads). sere[<metric>] = SERE with that "
             "calibration's artifact (tests/zoo/<model>/similarity_<metric>/). The substitution similarity "
             "(calibration/substitution.py) lies in [-1, 1] (0 = as bad as dropping the expert), so its rho = 0 and "
             "0.1 rows move almost nothing; its equal-budget rows are at rho = -1, where every secondary slot moves "
             f"(the budget of CKA at rho = 0), with random[substitution] = random re-routing of those same slots "
             f"(seed 0 in the methods tables; {RANDOM_SEEDS} seeds in the claim table). "
             "![quality vs activated experts](accuracy.png)\n"]
    if notes:
        parts.append(notes.strip() + "\n")
    parts.append("## The claim: SERE's similarity beats random re-routing (batch 16)\n")
    claims = claim_rows(rows)
    seeds = max((c["seeds"] for c in claims), default=1)
    parts.append(f"holds = SERE's KL below and top-1 above random's (seed 0, the gate's draw); the ranges are random "
                 f"re-routing over {seeds} seeds (same moved slots, other random targets); beats all = SERE outside the "
                 "range on both. At the paper's settings every similarity is set against random re-routing of the default "
                 "(CKA) artifact's moved slots; the substitution similarity, which moves almost nothing there, is set "
                 "against random[substitution] at rho = -1 instead (every secondary moves in both). experts = experts per "
                 "step, SERE / random: the budget.\n")
    parts.append("| model | SERE similarity | S | rho | experts | KL sere | KL random | KL random range | top-1 sere | "
                 "top-1 random | top-1 random range | holds | beats all |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|")
    for c in claims:
        (klo, khi), (tlo, thi) = c["random_kl_range"], c["random_top1_range"]
        parts.append(f"| {c['model']} | {c['method']} | {c['S']} | {c['rho']:g} | {c['sere_experts']:.2f} / "
                     f"{c['random_experts']:.2f} | {c['sere_kl']:.4f} | {c['random_kl']:.4f} | "
                     f"{klo:.4f}-{khi:.4f} | {c['sere_top1']:.4f} | {c['random_top1']:.4f} | {tlo:.4f}-{thi:.4f} | "
                     f"{'yes' if c['holds'] else 'NO'} | {'yes' if c['beats_every_seed'] else 'no'} |")
    parts += _composition_section(rows)
    parts += _grid_section(rows)
    parts += _shift_section(rows)
    parts += _batch64_section(rows)
    parts += _batch64_similarity_section(rows)
    drops = drop_rows(rows)
    if drops:
        parts += _drop_section(drops)
    parts.append("\n## Where SERE stands at equal budget (batch 16)\n\nEvery row keeps exactly the primary experts: "
                 "rho = 0 for CKA, cosine and Frobenius (their values are >= 0 here), rho = -1 for substitution; "
                 "truncate, drop and oea have no threshold.\n")
    parts += standing(rows)
    origin = [o for name in dict.fromkeys(r["model"] for r in rows) for o in shared_origin_rows(name, zoo)]
    if origin:
        parts.append("\n## Does the similarity see shared origin? (upcycled model)\n\n"
                     "Expert e of an upcycled model starts as a copy of dense shard e mod n. Per artifact and MoE layer: mean "
                     "similarity between copies of one shard and between other experts, and the share of experts whose most "
                     "similar other expert is a copy of its own shard.\n\n"
                     "| model | similarity | layer | same shard | other | nearest is same shard | chance |\n"
                     "|---|---|---:|---:|---:|---:|---:|")
        parts += [f"| {o['model']} | {o['similarity']} | {o['layer']} | {o['same_shard_mean']:.3f} | {o['other_mean']:.3f} | "
                  f"{o['nearest_same_shard']:.2f} | {o['chance']:.2f} |" for o in origin]
    for name in dict.fromkeys(r["model"] for r in rows):
        parts.append(f"\n## {name}\n\n### Methods at batch {MAIN_BATCH}\n\n{_HEADER}")
        parts += [_fmt_row(r) for r in rows if r["model"] == name and r["part"] == "methods"]
        parts.append(f"\n### Batch size (paper settings)\n\n| B | {_HEADER[2:].split(chr(10))[0]}\n|---:|{_HEADER.split(chr(10))[1][1:]}")
        parts += [f"| {r['batch_size']} {_fmt_row(r)}" for r in rows if r["model"] == name and r["part"] == "batch"]
    path.write_text("\n".join(parts) + "\n")


def _drop_section(drops) -> list[str]:
    """The drop control against truncation and re-routing, at equal budget (markdown lines)."""
    metrics = sorted({m for d in drops for m in d["all_move"]})
    seeds = max(d["random_seeds"] for d in drops)
    head = ("| model | S | experts per step | KL drop | KL truncate | KL oea | KL sere (CKA) | "
            + "".join(f"KL sere[{m}] (rho={ALL_MOVE_RHO[m]:g}) | " for m in metrics)
            + "KL random (draws) | top-1 drop | top-1 truncate | "
            + "".join(f"top-1 sere[{m}] | " for m in metrics) + "top-1 random |")
    # the budget: each case's largest relative spread of experts per step over the compared rows
    spread = max((max(xs) - min(xs)) / min(xs) for d in drops
                 for xs in [[r["experts_after"] for r in (d["drop"], d["truncate"], d["oea"], d["sere"], *d["all_move"].values())
                             if r]])
    lines = ["\n## Drop: the secondary experts' contribution removed, not re-routed (batch 16)\n",
             "drop keeps each token's top-S slots at their own weights and gives the others weight 0 (no "
             "renormalisation); truncate gives that weight to the token's top expert; the re-routing methods give each "
             "removed slot, at its weight, to a loaded expert. All keep the same primary experts (experts per step "
             f"equal within {100 * spread:.1f} %: later layers see other hidden states). The random column is re-routing "
             f"of every secondary slot, min-max over up to {seeds} seeds "
             "(random[substitution] at rho = -1 where measured). drop and truncate do not depend on the batch "
             "composition (each token alone decides), so they are not repeated over batch sizes.\n",
             head, "|---|---:|" + "---:|" * (5 + len(metrics)) + "---|---:|---:|" + "---:|" * len(metrics) + "---|"]
    for d in drops:
        kl = lambda r: f"{r['kl']:.4f}" if r else "-"  # noqa: E731
        t1 = lambda r: f"{r['top1_agreement']:.4f}" if r else "-"  # noqa: E731
        n_draws = d["random_seeds"]

        def span(lo_hi):  # min-max over the draws, or the single draw
            if not n_draws:
                return "-"
            lo, hi = lo_hi
            return f"{lo:.4f}-{hi:.4f} ({n_draws})" if n_draws > 1 else f"{lo:.4f} (1)"

        lines.append(f"| {d['model']} | {d['S']} | {d['drop']['experts_after']:.2f} | {kl(d['drop'])} | {kl(d['truncate'])} | "
                     f"{kl(d['oea'])} | {kl(d['sere'])} | " + "".join(f"{kl(d['all_move'].get(m))} | " for m in metrics)
                     + f"{span(d['random_kl_range'])} | {t1(d['drop'])} | {t1(d['truncate'])} | "
                     + "".join(f"{t1(d['all_move'].get(m))} | " for m in metrics) + f"{span(d['random_top1_range'])} |")
    # What the table says, counted (so the sentence stays true when the numbers change).
    n = len(drops)
    below_trunc = sum(d["drop"]["kl"] < d["truncate"]["kl"] for d in drops)
    below_rand = sum(d["random_kl_range"] is not None and d["drop"]["kl"] < d["random_kl_range"][0] for d in drops)
    lines.append(f"\nCounted over the {n} model x S cases: drop's KL is below truncate's in {below_trunc}, below every "
                 f"random re-routing draw in {below_rand}" + "".join(
                     f", below sere[{m}]'s in {sum(m in d['all_move'] and d['drop']['kl'] < d['all_move'][m]['kl'] for d in drops)}"
                     for m in metrics) + ".")
    return lines


def write_plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 7.5), squeeze=False)
    style = {"sere": ("C0", "o"), "random": ("C3", "x"), "truncate": ("C2", "s"), "drop": ("C7", "P"), "oea": ("C1", "^"),
             "sere[frobenius]": ("C4", "D"), "sere[cosine]": ("C5", "v"), "sere[substitution]": ("C9", "*")}
    for j, name in enumerate(names):
        mine = [r for r in rows if r["model"] == name and r["part"] == "methods"]
        for i, (metric, label) in enumerate((("kl", "KL(stock || re-routed), nats"), ("top1_agreement", "top-1 agreement"))):
            ax = axes[i][j]
            for method, (color, marker) in style.items():
                # One line per S (its points differ in rho; a line across S values would zigzag).
                # KL = 0 (nothing moved) cannot sit on the log axis and is left out.
                for n, S in enumerate(sorted({r["select_top_k"] for r in mine if r["method"] == method})):
                    pts = sorted((r["experts_after"], r[metric]) for r in mine if r["method"] == method
                                 and r["select_top_k"] == S and (metric != "kl" or r[metric] > 0))
                    if pts:
                        ax.plot(*zip(*pts), marker=marker, color=color, linewidth=1, markersize=5,
                                linestyle="-" if method in ("sere", "random") else ":", label=None if n else method)
            ax.axvline(mine[0]["stock_experts"], color="gray", linewidth=0.8, linestyle="--", label="stock")
            if metric == "kl":
                ax.set_yscale("log")
                ax.set_title(f"{name} (batch {MAIN_BATCH})")
            ax.set_xlabel("activated experts per decode step and layer")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(ZOO_MODELS), choices=ZOO_MODELS)
    p.add_argument("--out", type=Path, required=True,
                   help="folder of accuracy.json/md/png (this repository keeps its report in bench/results)")
    p.add_argument("--zoo-dir", type=Path, default=None,
                   help="zoo folder (default: $SERE_ZOO_DIR; this repository's is tests/zoo)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--notes", type=Path, default=None, help="markdown to put under the header (findings)")
    p.add_argument("--from-json", action="store_true", help="only re-render accuracy.md/png from accuracy.json")
    p.add_argument("--parts", default=None, help="comma-separated parts to measure (methods, seeds, batch, compositions, "
                   "shift, grid, batch64, batch64sim); with --merge their rows replace those of an earlier accuracy.json")
    p.add_argument("--merge", action="store_true", help="merge the measured rows into --out's accuracy.json")
    args = p.parse_args(argv)
    try:
        zoo = zoo_dir(args.zoo_dir)
    except ZooDirNotSet as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = args.notes.read_text() if args.notes else ""
    if args.from_json:  # re-render the report from a previous run's rows
        saved = json.loads((args.out / "accuracy.json").read_text())
        write_markdown(saved["rows"], args.out / "accuracy.md", saved["meta"], notes, zoo)
        write_plot(saved["rows"], args.out / "accuracy.png")
        write_composition_plot(saved["rows"], args.out / "accuracy_compositions.png")
        write_grid_plot(saved["rows"], args.out / "accuracy_grid.png")
        print(f"re-rendered {args.out / 'accuracy.md'} and accuracy.png from accuracy.json")
        return
    start = time.time()
    parts = set(args.parts.split(",")) if args.parts else None
    rows = []
    for name in args.models:
        rows += sweep_model(name, zoo=zoo, parts=parts)
    earlier_meta = None
    if args.merge:  # keep the earlier rows of other (model, part) pairs, and say what was merged in
        saved = json.loads((args.out / "accuracy.json").read_text())
        fresh = {(r["model"], r["part"]) for r in rows}
        rows = [r for r in saved["rows"] if (r["model"], r["part"]) not in fresh] + rows
        earlier_meta = saved["meta"]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m sere.harness.zoo.sweep" + (f" --models {' '.join(args.models)}" if args.models != list(ZOO_MODELS) else ""),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "minutes": (time.time() - start) / 60,
    }
    if earlier_meta is not None:
        meta = {**earlier_meta, "merged": [*earlier_meta.get("merged", []), {**meta, "parts": sorted(parts or [])}]}
    (args.out / "accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_markdown(rows, args.out / "accuracy.md", meta, notes, zoo)
    write_plot(rows, args.out / "accuracy.png")
    write_composition_plot(rows, args.out / "accuracy_compositions.png")
    write_grid_plot(rows, args.out / "accuracy_grid.png")
    print(f"wrote {args.out / 'accuracy.md'}, accuracy.png, accuracy.json ({len(rows)} rows, {meta['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
