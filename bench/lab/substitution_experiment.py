"""Does the substitution similarity make SERE beat random re-routing on the zoo? (CPU, minutes)

    python -m sere.calibration --model_path tests/zoo/<m> --output_path /tmp/sere_subst/<m> \
        --max_len 128 --dtype float32 --similarity_method substitution      # per zoo model, first
    SERE_ZOO_DIR=tests/zoo python -m bench.lab.substitution_experiment --artifacts /tmp/sere_subst [--models qwen2_moe ...]

For each zoo model, on the held-out text at batch 16 (sere.harness.fidelity, as sere.harness.zoo.sweep runs it):
SERE with the committed linear-CKA artifact and with the substitution artifact, each against
`random` re-routing of the same moved slots over RANDOM_SEEDS seeds, at the paper's settings
(S=2, rho=0.1; S=1, rho=0) and, for substitution, at rho=-1 (every secondary slot moves, as CKA
does at rho=0; random is then the same as CKA's rho=0 random). Also, per artifact and layer, how
many experts have a stand-in better than dropping them (best off-diagonal sim > 0).
--clip-check runs only the same matrices clipped to [0, 1] (rho = 0, every slot moves);
--uniform-check only artifacts calibrated with --substitution_weighting uniform, from
<artifacts>/uniform/<m> (both at equal budget against CKA's rho = 0 random rows).
Writes <artifacts>/substitution_results.json (or --out) and prints the markdown tables;
--from-json a.json b.json ... merges earlier runs and only prints.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sere.artifact import load_similarity
from sere.harness.fidelity import Composition, fidelity, reference_pass
from sere.harness.zoo import ZOO_MODELS, heldout_ids, load_zoo_model, model_dir
from sere.harness.zoo.sweep import MAIN_BATCH, NUM_WINDOWS, RANDOM_SEEDS, SEQ_LEN

# (similarity label, S, rho, run random with this artifact and rho?) ; "all" = every secondary moves
SETTINGS = (
    ("cka", 2, 0.1, True), ("cka", 1, 0.0, True), ("cka", 2, 0.0, True),
    ("substitution", 2, 0.1, True), ("substitution", 1, 0.0, True),
    ("substitution", 2, -1.0, False), ("substitution", 1, -1.0, False),
)
# The clipping check: the same matrices clipped to [0, 1] instead of [-1, 1], where rho = 0 moves
# every slot too but every candidate worse than dropping ties at 0 (argmax: smallest id).
CLIP01_SETTINGS = (("substitution[0,1]", 2, 0.0, False), ("substitution[0,1]", 1, 0.0, False))
# The weighting check: artifacts calibrated with --substitution_weighting uniform, in <artifacts>/uniform/<m>.
UNIFORM_SETTINGS = (("substitution[uniform]", 2, -1.0, False), ("substitution[uniform]", 1, -1.0, False))
MOVE_ALL_RANDOM = {("substitution", 2, -1.0): ("cka", 2, 0.0), ("substitution", 1, -1.0): ("cka", 1, 0.0),
                   ("substitution[0,1]", 2, 0.0): ("cka", 2, 0.0), ("substitution[0,1]", 1, 0.0): ("cka", 1, 0.0),
                   ("substitution[uniform]", 2, -1.0): ("cka", 2, 0.0), ("substitution[uniform]", 1, -1.0): ("cka", 1, 0.0)}


def artifact_stats(path: Path, config) -> list[dict]:
    out = []
    for layer, sim in sorted(load_similarity(path, config=config).matrices.items()):
        off = ~torch.eye(sim.shape[0], dtype=torch.bool)
        best = sim.masked_fill(~off, -float("inf")).max(1).values  # E
        out.append({"layer": layer, "best_mean": float(best.mean()), "better_than_drop": int((best > 0).sum()),
                    "best_ge_0.1": int((best >= 0.1).sum()), "experts": sim.shape[0],
                    "symmetric_gap": float((sim - sim.T).abs().max()), "offdiag_mean": float(sim[off].mean())})
    return out


def run_model(name: str, artifacts: Path, seeds: int, settings=SETTINGS) -> dict:
    model, tok = load_zoo_model(name)
    sims = {"cka": model_dir(name) / "sere_similarity.safetensors",
            "substitution": artifacts / name / "sere_similarity.safetensors"}
    if any(label == "substitution[uniform]" for label, *_ in settings):
        sims["substitution[uniform]"] = artifacts / "uniform" / name / "sere_similarity.safetensors"
    for label, p in sims.items():
        if not p.is_file():
            raise FileNotFoundError(f"{name}: no {label} artifact at {p}")
    sims["substitution[0,1]"] = {layer: m.clamp(0, 1) for layer, m in load_similarity(
        sims["substitution"], config=model.config).matrices.items()}
    ref = reference_pass(model, heldout_ids(tok), Composition(MAIN_BATCH, SEQ_LEN, NUM_WINDOWS))
    jobs = []
    for label, S, rho, with_random in settings:
        jobs.append((label, S, rho, "sere", None))
        if with_random:
            jobs += [(label, S, rho, "random", {"seed": s}) for s in range(seeds)]
    rows = []
    for label, S, rho, method, opts in tqdm(jobs, desc=name, unit="run"):
        # greedy=False: KL and top-1 are the measures here; the greedy-match decode would triple the time.
        m = fidelity(model, ref, sims[label], select_top_k=S, threshold=rho, method=method, method_options=opts,
                     greedy=False)
        rows.append({"model": name, "similarity": label, "S": S, "rho": rho, "method": method,
                     "seed": opts["seed"] if opts else None, "stock_experts": ref.experts, **m.as_dict()})
    stats = {label: artifact_stats(p, model.config) for label, p in sims.items() if isinstance(p, Path)}
    return {"rows": rows, "artifact_stats": stats}


def table(results: dict) -> str:
    lines = ["| model | similarity | S | rho | experts/step (stock) | KL sere | KL random (seed 0) | KL random range "
             "| top-1 sere | top-1 random range | SERE beats every seed |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for name, res in results.items():
        rows = res["rows"]
        for label, S, rho, _ in SETTINGS + CLIP01_SETTINGS + UNIFORM_SETTINGS:
            s = next((r for r in rows if r["similarity"] == label and r["S"] == S and r["rho"] == rho and r["method"] == "sere"), None)
            if s is None:
                continue
            rl, rS, rr = MOVE_ALL_RANDOM.get((label, S, rho), (label, S, rho))
            rnd = [r for r in rows if r["similarity"] == rl and r["S"] == rS and r["rho"] == rr and r["method"] == "random"]
            if not rnd:  # its random rows are in another results file
                continue
            kls, t1 = [r["kl"] for r in rnd], [r["top1_agreement"] for r in rnd]
            beats = s["kl"] < min(kls) and s["top1_agreement"] > max(t1)
            rho_txt = "-1 (all move)" if rho == -1 else f"{rho:g}"
            lines.append(f"| {name} | {label} | {S} | {rho_txt} | {s['experts_after']:.2f} ({s['stock_experts']:.2f}) "
                         f"| {s['kl']:.4f} | {rnd[0]['kl']:.4f} | {min(kls):.4f}-{max(kls):.4f} | {s['top1_agreement']:.4f} "
                         f"| {min(t1):.4f}-{max(t1):.4f} | {'yes' if beats else 'no'} |")
    return "\n".join(lines)


def stats_table(results: dict) -> str:
    lines = ["| model | similarity | layer | mean best off-diagonal sim | experts with a stand-in better than dropping (sim > 0) "
             "| best >= 0.1 | max asymmetry |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        for label, st in res["artifact_stats"].items():
            for s in st:
                lines.append(f"| {name} | {label} | {s['layer']} | {s['best_mean']:.3f} | {s['better_than_drop']} of "
                             f"{s['experts']} | {s['best_ge_0.1']} | {s['symmetric_gap']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=Path("/tmp/sere_subst"))
    p.add_argument("--models", nargs="+", default=list(ZOO_MODELS), choices=ZOO_MODELS)
    p.add_argument("--seeds", type=int, default=RANDOM_SEEDS)
    p.add_argument("--clip-check", action="store_true", help="only the [0, 1]-clipped variant (CLIP01_SETTINGS)")
    p.add_argument("--uniform-check", action="store_true", help="only the uniform-weighting artifacts (UNIFORM_SETTINGS)")
    p.add_argument("--out", type=Path, help="results json (default: <artifacts>/substitution_results.json)")
    p.add_argument("--from-json", nargs="*", type=Path, help="only print the tables of previous runs' json files")
    args = p.parse_args(argv)
    out = args.out or args.artifacts / "substitution_results.json"
    if args.from_json is not None:
        results = {}
        for f in args.from_json or [out]:
            for name, res in json.loads(f.read_text())["results"].items():  # rows of one model add up
                mine = results.setdefault(name, {"rows": [], "artifact_stats": {}})
                mine["rows"] += res["rows"]
                mine["artifact_stats"].update(res["artifact_stats"])
    else:
        start = time.time()
        settings = CLIP01_SETTINGS if args.clip_check else UNIFORM_SETTINGS if args.uniform_check else SETTINGS
        results = {name: run_model(name, args.artifacts, args.seeds, settings) for name in args.models}
        meta = {"minutes": (time.time() - start) / 60, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {out} ({meta['minutes']:.1f} min)")
    print(table(results))
    print()
    print(stats_table(results))


if __name__ == "__main__":
    main()
