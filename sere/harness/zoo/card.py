"""Write the card of a trained zoo model: README.md (for people) and card.json (for tools).

    python -m sere.harness.zoo.card --model qwen2_moe --zoo-dir tests/zoo   # after training and calibration

Measures on the committed held-out texts (<zoo>/heldout/<domain>.txt) only: perplexity per
domain against that text's own unigram model, the routing entropies and the domain-expert
mutual information per MoE layer (sere.harness.zoo.evaluate); reads the training log for seed,
steps, tokens, wall time and the loss curve; names the similarity artifacts that are there.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sere.harness.zoo import ZooDirNotSet, heldout_texts, load_zoo_model, model_dir, zoo_dir
from sere.harness.zoo.data import encode
from sere.harness.zoo.evaluate import domain_expert_information, expert_routing, layer_entropies, text_unigram_perplexity
from sere.harness.zoo.models import ZOO_MODELS, count_parameters

EVAL_SEQ_LEN = 128


def measure(name: str, zoo_dir=None) -> dict:
    """Held-out numbers of zoo model `name`, from the committed held-out texts alone: per domain
    perplexity against the text's own unigram model; per MoE layer the routing entropies over
    all domains and the mutual information between domain and chosen expert."""
    model, tok = load_zoo_model(name, zoo_dir=zoo_dir)
    domains, accs = {}, {}
    for d, text in heldout_texts(zoo_dir).items():  # one pass per domain gives perplexity and routing
        ids = encode(tok, text)  # N
        acc, ppl = expert_routing(model, ids, EVAL_SEQ_LEN)
        uni = text_unigram_perplexity(ids)
        domains[d] = {"tokens": ids.numel(), "ppl": round(ppl, 3), "unigram_ppl": round(uni, 3), "ratio": round(ppl / uni, 4)}
        for layer, a in acc.items():
            accs.setdefault(layer, {})[d] = a
    routing = {layer: {**layer_entropies(per_domain.values()), **_domain_info({d: a["loads"] for d, a in per_domain.items()})}
               for layer, per_domain in accs.items()}
    return {
        "parameters": count_parameters(model),
        "domains": domains,
        "routing": {str(k): {m: round(v, 4) for m, v in r.items()} for k, r in routing.items()},
    }


def _domain_info(per_domain: dict) -> dict:
    info = domain_expert_information(per_domain)
    return {"domain_mi_bits": info["mi_bits"], "domain_mi_max_bits": info["max_bits"],
            "domain_load_entropy": info["domain_load_entropy"]}


def _curve_points(curve: list[dict], n: int = 8) -> list[dict]:
    """n evenly spaced points of the loss curve, the last step included."""
    if not curve:
        return []
    idx = sorted({round(i * (len(curve) - 1) / (n - 1)) for i in range(n)})
    return [curve[i] for i in idx]


def render(name: str, cfg, log: dict, m: dict, has_artifact: bool, zoo_dir=None) -> str:
    E = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts")
    shared = {
        "qwen2_moe": f"1 gated shared expert (intermediate {getattr(cfg, 'shared_expert_intermediate_size', '-')})",
        "deepseek_v2": f"{getattr(cfg, 'n_shared_experts', '-')} shared experts; layer 0 dense (first_k_dense_replace=1); top-k unsorted",
        "qwen3_moe": "no shared expert",
        "qwen2_moe_upcycled": f"1 gated shared expert (intermediate {getattr(cfg, 'shared_expert_intermediate_size', '-')})",
    }[name]
    a = log["args"]
    rows = "\n".join(
        f"| {k} | {d['load_entropy']:.3f} | {d['router_entropy']:.3f} | {d['max_load_share']:.3f} | {d['min_load_share']:.4f} "
        f"| {d['domain_mi_bits']:.2f} of {d['domain_mi_max_bits']:.2f} | {d['domain_load_entropy']:.3f} |"
        for k, d in m["routing"].items()
    )
    domains = "\n".join(
        f"| {d}{' (never trained)' if d not in log.get('train_tokens_per_domain', {d: 0}) else ''} | {v['tokens']:,} "
        f"| {v['ppl']:.2f} | {v['unigram_ppl']:.1f} | {v['ratio']:.3f} |"
        for d, v in m["domains"].items()
    )
    per_domain = log.get("train_tokens_per_domain", {})
    best_eval = min(log["heldout_evals"], key=lambda e: e["val_ppl"]) if log.get("heldout_evals") else {}
    curve = "\n".join(
        f"| {p['step']} | {p['loss']:.3f} | {p['aux_loss']:.3f} | {p['lr']:.2e} | {p['elapsed_s']} |"
        for p in _curve_points(log["curve"])
    )
    calib_flags = " --device cuda --dtype float32" if a.get("device", "cpu") != "cpu" else ""
    found = sorted(p.name.removeprefix("similarity_") for p in model_dir(name, zoo_dir).glob("similarity_*") if p.is_dir())
    variants = "".join(
        f"- `similarity_{v}/`: " + (f"linear CKA calibrated on one domain only (`calibration/data/domains/{v[4:]}.txt`), "
                                     "for the calibration-domain-shift study" if v.startswith("cka_") else
                                     f"`--similarity_method {v}` on the same mix") + "\n" for v in found
    )
    stop = {"steps": "the step count", "time": "the time budget; the schedule ran by time"}.get(
        log.get("stopped_by", "steps" if log["steps_done"] >= a["steps"] else "time"), log.get("stopped_by"))
    selection = ""
    if "saved_step" in log:
        selection = (f"\nSaved: the weights of step {log['saved_step']}, the best of the evaluations every {a['eval_every']} steps by "
                     f"the geometric mean over domains of the validation perplexity ({log['validation_tokens']:,} tokens, each "
                     f"domain's validation split; not the held-out text): {log['best_val_ppl']:.2f}; per domain "
                     + ", ".join(f"{d} {v}" for d, v in best_eval.get("val_ppl_per_domain", {}).items()) + ".\n")
    upcycling = _upcycling_section(log.get("upcycle"))
    return f"""# Zoo model `{name}` ({cfg.model_type})

A small Mixture-of-Experts causal LM trained in this project on ten domains (the King James
Bible, Python documentation, Python and Perl source, manual pages, German, Spanish, Italian,
Russian and Chinese fortunes; ../DATA.md), to measure what SERE re-routing costs in quality
(tests/test_accuracy.py, bench/results/accuracy.md). Not a useful language model for anything else.

## Architecture
transformers `{type(cfg).__name__}`: {cfg.num_hidden_layers} decoder layers, hidden {cfg.hidden_size},
{cfg.num_attention_heads} heads, {E} routed experts, top-{cfg.num_experts_per_tok} (expert
intermediate {cfg.moe_intermediate_size}), {shared}; vocabulary {cfg.vocab_size} (byte-level BPE,
../tokenizer/), tied embeddings, context {cfg.max_position_embeddings}. {m['parameters']:,} parameters;
`model.safetensors` {log['checkpoint_bytes']:,} bytes (bf16).

## Training
{upcycling}`python -m sere.harness.zoo.train --model {name} {_train_flags(a)}`
on {log['device']}, torch {log['torch']}, {log['date']}, {log.get('precision', 'float32')}: {log['steps_done']} steps,
{log['tokens_seen']:,} tokens seen ({log['tokens_seen'] / log['train_tokens']:.2f} epochs of {log['train_tokens']:,}; each window
from a domain drawn uniformly: {", ".join(f"{d} {n:,}" for d, n in per_domain.items())} training tokens),
{log['wall_s'] / 60:.1f} min wall (stopped by {stop}), seed {log['seed']}. AdamW (betas 0.9/0.95, weight decay 0.1),
linear warm-up then cosine decay to 10 %, gradient clip 1.0, load-balancing loss coefficient {cfg.router_aux_loss_coef}.
{selection}The loss curve (means over {a['log_every']} steps) is in `train_log.json`; evenly spaced points
(loss = LM loss without the aux loss):

| step | loss | aux loss | lr | elapsed s |
|---:|---:|---:|---:|---:|
{curve}

## Held-out perplexity per domain (windows of {EVAL_SEQ_LEN}, CPU float32)
Against the text's own unigram model (its token frequencies fitted on that very text: the best
any context-free model can do there, stricter than a unigram model of the training text).
`en_fortunes` is modern English prose that no model trained on.

| domain | tokens | perplexity | unigram | ratio |
|---|---:|---:|---:|---:|
{domains}

## Routing per MoE layer
Over all held-out text: load entropy = entropy of each expert's share of top-k slots / log E
(1.0 = uniform; the load-balancing loss keeps it high); router entropy = mean entropy of a
token's softmax over experts / log E (low = decisive); max / min load share (uniform =
{1 / E:.4f}). Per domain: mutual information between domain and chosen expert (bits, domains
weighted equally; the bound is log2 of the domain count) and the mean load entropy within one
domain (lower than the overall one = each domain uses its own experts).

| layer | load entropy | router entropy | max share | min share | MI(domain; expert) bits | load entropy in a domain |
|---:|---:|---:|---:|---:|---:|---:|
{rows}

## Similarity artifacts
{"`sere_similarity.safetensors`: `python -m sere.calibration --model_path tests/zoo/" + name + " --data_path mix.jsonl --max_len 256" + calib_flags + "` (linear CKA, the command's default) on the shipped multi-domain mix (calibration/data/multidomain_mix.txt, training text only, cut into ~1600-character documents by sere.harness.zoo.calib_text); `sere_similarity.png` is its heat map." if has_artifact else "not calibrated yet."}
{variants}"""


def _train_flags(a: dict) -> str:
    """The training command's flags as the log recorded them (older logs lack the newer ones)."""
    flags = [f"--steps {a['steps']}", f"--max-minutes {a['max_minutes']}", f"--batch {a['batch']}", f"--seq-len {a['seq_len']}",
             f"--lr {a['lr']}", f"--warmup {a['warmup']}", f"--seed {a['seed']}"]
    if a.get("device", "cpu") != "cpu":
        flags.insert(0, f"--device {a['device']}")
    if a.get("threads"):
        flags.append(f"--threads {a['threads']}")
    if "eval_every" in a:
        flags.append(f"--eval-every {a['eval_every']}")
    if a.get("patience"):
        flags.append(f"--patience {a['patience']}")
    if a.get("init_from"):
        flags.append(f"--init-from {a['init_from']} --reinit-fraction {a['reinit_fraction']}")
    return " ".join(flags)


def _upcycling_section(up: dict | None) -> str:
    """How an upcycled model was initialised (sere.harness.zoo.upcycle), with its dense model's training."""
    if not up:
        return ""
    d = up.get("dense_log", {})
    dense = (f"The dense model (`qwen2_dense`, {d['parameters']:,} parameters, FFN intermediate "
             f"{up['n_shards'] * up['expert_intermediate']}) was trained first with the same script: {d['steps_done']} steps, "
             f"{d['wall_s'] / 60:.1f} min on {d['device']}, best validation perplexity {d.get('best_val_ppl', float('nan')):.2f} "
             f"(step {d.get('saved_step', '-')}); its log is `dense_train_log.json` (weights not kept: "
             "bench/gpu/train_zoo.sh retrains it).\n" if d else "")
    return f"""Upcycled, the way Qwen1.5-MoE was made from Qwen-1.8B (sere/harness/zoo/upcycle.py): the trained dense model's
FFN split into {up['n_shards']} shards of {up['expert_intermediate']} neurons; routed expert e = shard (e mod {up['n_shards']}), so
{up['copies_per_shard']} copies of each shard; each copy's neurons shuffled, then {up['reinit_neurons_per_expert']} of its {up['expert_intermediate']}
neurons ({up['reinit_fraction']:.0%}) re-initialised (normal, std 0.02); shared expert = {up['shared_expert']};
attention, embeddings and norms copied; router {up['router']}; seed {up['seed']}.
{dense}Then trained as an MoE:

"""


def write_card(name: str, zoo_dir=None) -> Path:
    path = model_dir(name, zoo_dir)
    log = json.loads((path / "train_log.json").read_text())
    m = measure(name, zoo_dir)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    (path / "card.json").write_text(json.dumps(m, indent=1) + "\n")
    (path / "README.md").write_text(render(name, cfg, log, m, (path / "sere_similarity.safetensors").exists(),
                                          zoo_dir))
    return path / "README.md"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=ZOO_MODELS)
    p.add_argument("--zoo-dir", type=Path, default=None,
                   help="zoo folder (default: $SERE_ZOO_DIR; this repository's is tests/zoo)")
    args = p.parse_args(argv)
    try:
        zoo = zoo_dir(args.zoo_dir)
    except ZooDirNotSet as e:
        p.error(str(e))
    print(write_card(args.model, zoo))


if __name__ == "__main__":
    main()
