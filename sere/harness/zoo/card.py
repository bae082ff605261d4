"""Write the card of a trained zoo model: README.md (for people) and card.json (for tools).

    python -m sere.harness.zoo.card --model qwen2_moe --zoo-dir tests/zoo   # after sere-zoo-train and calibration

Measures on the committed held-out text: perplexity, the unigram baseline of the same
tokenizer (token frequencies of the training split, add-one smoothed), and the routing
entropies per MoE layer (sere.harness.zoo.evaluate); reads the training log for seed, steps, wall
time and the loss curve; names the similarity artifact if one is there.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sere.harness.zoo import ZooDirNotSet, heldout_ids, load_zoo_model, model_dir, zoo_dir
from sere.harness.zoo.data import DEFAULT_VOCAB, HELDOUT_EVERY, HELDOUT_OFFSET, encode, prepare
from sere.harness.zoo.evaluate import heldout_perplexity, routing_entropy, unigram_perplexity
from sere.harness.zoo.models import ZOO_MODELS, count_parameters
from sere.harness.zoo.train import DEFAULT_DATA_DIR

EVAL_SEQ_LEN = 128


def measure(name: str, data_dir: Path, zoo_dir=None) -> dict:
    """Held-out numbers of zoo model `name` (needs the training split for the unigram baseline)."""
    model, tok = load_zoo_model(name, zoo_dir=zoo_dir)
    held = heldout_ids(tok, zoo_dir)  # N
    train_ids = encode(tok, Path(prepare(data_dir)["train"]).read_text())  # N'
    ppl = heldout_perplexity(model, held, EVAL_SEQ_LEN)
    uni = unigram_perplexity(train_ids, held, len(tok))
    return {
        "parameters": count_parameters(model),
        "heldout_tokens": held.numel(),
        "heldout_ppl": round(ppl, 3),
        "unigram_ppl": round(uni, 3),
        "ppl_vs_unigram": round(ppl / uni, 4),
        "routing": {str(k): {m: round(v, 4) for m, v in d.items()} for k, d in routing_entropy(model, held).items()},
    }


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
        f"| {k} | {d['load_entropy']:.3f} | {d['router_entropy']:.3f} | {d['max_load_share']:.3f} | {d['min_load_share']:.4f} |"
        for k, d in m["routing"].items()
    )
    curve = "\n".join(
        f"| {p['step']} | {p['loss']:.3f} | {p['aux_loss']:.3f} | {p['lr']:.2e} | {p['elapsed_s']} |"
        for p in _curve_points(log["curve"])
    )
    # On the GPU host bench/gpu/train_zoo.sh calibrates in float32 (the command's default there is bfloat16).
    calib_flags = " --device cuda --dtype float32" if a.get("device", "cpu") != "cpu" else ""
    found = sorted(p.name.removeprefix("similarity_") for p in model_dir(name, zoo_dir).glob("similarity_*") if p.is_dir())
    variants = "".join(
        f"`similarity_{v}/`: the same command with `--similarity_method {v} --output_path tests/zoo/{name}/similarity_{v}` "
        "(compared in bench/results/accuracy.md).\n" for v in found
    )
    stop = {"steps": "the step count", "time": "the time budget; the schedule ran by time"}.get(
        log.get("stopped_by", "steps" if log["steps_done"] >= a["steps"] else "time"), log.get("stopped_by"))
    selection = ""
    if "saved_step" in log:
        selection = (f"\nSaved: the weights of step {log['saved_step']}, the best of the evaluations every {a['eval_every']} steps by "
                     f"perplexity on a validation split of the training text ({log['validation_tokens']:,} tokens, "
                     f"sere.harness.zoo.data.split_validation; not the held-out text): {log['best_val_ppl']:.2f}.\n")
    upcycling = _upcycling_section(log.get("upcycle"))
    return f"""# Zoo model `{name}` ({cfg.model_type})

A small Mixture-of-Experts causal LM trained in this project on the King James Bible, to
measure what SERE re-routing costs in quality (tests/test_accuracy.py). Not a useful language
model for anything else.

## Architecture
transformers `{type(cfg).__name__}`: {cfg.num_hidden_layers} decoder layers, hidden {cfg.hidden_size},
{cfg.num_attention_heads} heads, {E} routed experts, top-{cfg.num_experts_per_tok} (expert
intermediate {cfg.moe_intermediate_size}), {shared}; vocabulary {cfg.vocab_size}, tied
embeddings. {m['parameters']:,} parameters; `model.safetensors` {log['checkpoint_bytes']:,} bytes (fp16).

## Data
King James Bible (public domain) from the Debian packages `bible-kjv-text` / `bible-kjv` 4.38,
see ../DATA.md. Split by chapter: chapter c (0..1188, canonical order) is held out when
c % {HELDOUT_EVERY} == {HELDOUT_OFFSET}; the held-out text is ../heldout.txt. Tokenizer:
byte-level BPE, {DEFAULT_VOCAB} tokens, trained with `tokenizers` on the training split
(`tokenizer.json`, shared by the zoo models).

## Training
{upcycling}`python -m sere.harness.zoo.train --model {name} {_train_flags(a)}`
on {log['device']} ({log['threads']} CPU threads), torch {log['torch']}, {log['date']}: {log['steps_done']} steps,
{log['tokens_seen']:,} tokens seen ({log['tokens_seen'] / log['train_tokens']:.2f} epochs of {log['train_tokens']:,}),
{log['wall_s'] / 60:.1f} min wall (stopped by {stop}). AdamW (betas 0.9/0.95, weight decay 0.1), linear warm-up then cosine
decay to 10 %, gradient clip 1.0, load-balancing loss coefficient {cfg.router_aux_loss_coef}.
{selection}The loss curve (means over {a['log_every']} steps) is in `train_log.json`; evenly spaced points
(loss = LM loss without the aux loss; the held-out perplexity along the way is in the log too):

| step | loss | aux loss | lr | elapsed s |
|---:|---:|---:|---:|---:|
{curve}

## Held-out numbers ({m['heldout_tokens']:,} tokens, windows of {EVAL_SEQ_LEN})
| perplexity | unigram baseline (same tokenizer) | ratio |
|---:|---:|---:|
| {m['heldout_ppl']:.2f} | {m['unigram_ppl']:.2f} | {m['ppl_vs_unigram']:.3f} |

Routing per MoE layer (entropies divided by log E, so 1.0 = uniform): load entropy = entropy
of the share of top-k slots each expert gets over the held-out text (the load-balancing loss
keeps it high on purpose); router entropy = mean entropy of a token's softmax over experts
(low = the router picks decisively); max / min load share of one expert (uniform = {1 / E:.4f}).

| layer | load entropy | router entropy | max share | min share |
|---:|---:|---:|---:|---:|
{rows}

## Similarity artifact
{"`sere_similarity.safetensors`: written by `python -m sere.calibration --model_path tests/zoo/" + name + " --max_len 128" + calib_flags + "` (linear CKA, the command's default, on the shipped Genesis text, which is all training text); `sere_similarity.png` is its heat map." if has_artifact else "not calibrated yet."}
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


def write_card(name: str, data_dir: Path, zoo_dir=None) -> Path:
    path = model_dir(name, zoo_dir)
    log = json.loads((path / "train_log.json").read_text())
    m = measure(name, data_dir, zoo_dir)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    (path / "card.json").write_text(json.dumps(m, indent=1) + "\n")
    (path / "README.md").write_text(render(name, cfg, log, m, (path / "sere_similarity.safetensors").exists(),
                                          zoo_dir))
    return path / "README.md"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=ZOO_MODELS)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--zoo-dir", type=Path, default=None,
                   help="zoo folder (default: $SERE_ZOO_DIR; this repository's is tests/zoo)")
    args = p.parse_args(argv)
    try:
        zoo = zoo_dir(args.zoo_dir)
    except ZooDirNotSet as e:
        p.error(str(e))
    print(write_card(args.model, args.data_dir, zoo))


if __name__ == "__main__":
    main()
