"""Record the routing traces of the zoo models into bench/traces/<model>.safetensors.

    python -m bench.record_traces                       # all four zoo models (from the repository root)
    python -m bench.record_traces --model qwen3_moe     # one
    python -m bench.record_traces --check               # regenerate in memory, compare with the files

What is recorded, per zoo model (tests/zoo/<model>, trained on ten domains, see tests/zoo/README.md):
the top-k ids and weights of every MoE router while the model decodes the held-out texts
(tests/zoo/heldout/*.txt, joined in name order, so the evenly spaced windows span the domains) in decode batches: SEQUENCES windows of the text, evenly spaced, are
prefilled with PREFILL tokens (not recorded), then STEPS decode steps follow, each one token per
sequence through the KV cache, teacher-forced (the next token of the text, not a sampled one).
Each step is a batch of SEQUENCES tokens from different sequences, as in serving; the trace
rows are in step order (rows [t*SEQUENCES, (t+1)*SEQUENCES) are step t). The model's calibrated
similarity (`sere_similarity.safetensors`, linear CKA) goes into the same file, so that a bench
replaying the trace runs SERE on the similarity the model was calibrated with.

Deterministic: no sampling, fixed windows, float32 on one CPU thread; `--check` verifies that a
regeneration gives the committed tensors (ids, weights, similarity) and metadata exactly (the
bytes may differ: safetensors writes the metadata keys in no fixed order), and that one full causal forward over the same
windows routes the decode positions to the same experts (the KV-cache decode is what a plain
forward would give). Replay: bench/routing.py (`trace:PATH[@LAYER]`).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tqdm import tqdm

from bench.routing import load_trace, record_trace, save_trace

TRACE_DIR = Path(__file__).resolve().parent / "traces"
# The zoo the committed traces were recorded on (bench/ is not installed: a checkout path is fine here).
REPO_ZOO = Path(__file__).resolve().parents[1] / "tests" / "zoo"
SEQUENCES, PREFILL, STEPS = 32, 64, 32  # 1024 recorded tokens per MoE layer


def decode_windows(num_tokens: int) -> list[int]:
    """Start offsets of SEQUENCES windows of PREFILL + STEPS tokens spread over the text."""
    span = PREFILL + STEPS
    if num_tokens < span * SEQUENCES:
        raise ValueError(f"held-out text has {num_tokens} tokens, fewer than {SEQUENCES} windows of {span}")
    stride = (num_tokens - span) // (SEQUENCES - 1)
    return [i * stride for i in range(SEQUENCES)]


def zoo_windows(name: str, zoo: Path):
    """(model, windows [B, PREFILL + STEPS] of held-out token ids) of zoo model `name`."""
    from sere.harness.zoo import heldout_ids, load_zoo_model

    model, tokenizer = load_zoo_model(name, zoo_dir=zoo)
    text = heldout_ids(tokenizer, zoo)  # N
    windows = torch.stack([text[s:s + PREFILL + STEPS] for s in decode_windows(text.numel())])  # B, PREFILL + STEPS
    return model, windows


def full_forward_ids(model, windows) -> dict[int, torch.Tensor]:
    """Per MoE layer, the ids one causal forward over `windows` gives the decode positions,
    in the trace's step order (step-major), each row sorted (to compare as sets)."""
    rec = record_trace(model, [windows], source="full forward")
    out = {}
    for layer, ids in rec["ids"].items():  # B * (PREFILL + STEPS), k
        per_seq = ids.view(SEQUENCES, PREFILL + STEPS, -1)[:, PREFILL:]  # B, STEPS, k
        out[layer] = torch.sort(per_seq.transpose(0, 1).reshape(-1, ids.shape[-1]), dim=1).values  # STEPS * B, k
    return out


def record_model(name: str, zoo: Path) -> dict:
    """save_trace kwargs for zoo model `name`: decode-step routing plus calibrated similarity."""
    from transformers import DynamicCache

    from sere.artifact import load_similarity
    from sere.harness.zoo import model_dir

    model, windows = zoo_windows(name, zoo)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # the prefill fills the cache; only the decode steps are recorded
        model(input_ids=windows[:, :PREFILL], past_key_values=cache, use_cache=True)
    steps = (dict(input_ids=windows[:, PREFILL + t:PREFILL + t + 1], past_key_values=cache, use_cache=True)
             for t in range(STEPS))  # each: B, 1
    source = (f"tests/zoo/heldout/ (all domains): {SEQUENCES} sequences x {STEPS} decode steps (KV cache, teacher-forced) "
              f"after a {PREFILL}-token prefill; rows in step order")
    rec = record_trace(model, tqdm(steps, total=STEPS, desc=f"{name} decode", leave=False), source=source)
    rec["model"] = f"zoo/{name}"  # not the checkout's absolute path: the file must not depend on it
    rec["similarity"] = load_similarity(model_dir(name, zoo), config=model.config).matrices
    return rec


def main(argv=None) -> None:
    from sere.harness.zoo import ZOO_DIR_ENV, ZOO_MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=ZOO_MODELS, action="append", help="zoo model(s); default: all")
    ap.add_argument("--out", type=Path, default=TRACE_DIR, help=f"folder of the trace files (default {TRACE_DIR})")
    ap.add_argument("--check", action="store_true", help="regenerate in memory and compare with the files")
    ap.add_argument("--zoo-dir", type=Path, default=Path(os.environ.get(ZOO_DIR_ENV) or REPO_ZOO),
                    help=f"zoo folder (default: ${ZOO_DIR_ENV}, else {REPO_ZOO})")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the same float32 sums, so the same top-k, every run
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.model or ZOO_MODELS:
        rec = record_model(name, args.zoo_dir)
        path = args.out / f"{name}.safetensors"
        if args.check:
            stored = load_trace(path)
            same = (stored.layers == sorted(rec["ids"]) and (stored.model, stored.source) == (rec["model"], rec["source"])
                    and all(torch.equal(stored.ids[layer].long(), rec["ids"][layer].long())
                            and torch.equal(stored.weights[layer], rec["weights"][layer])
                            and torch.equal(stored.similarity[layer], rec["similarity"][layer])
                            for layer in stored.layers))
            model, windows = zoo_windows(name, args.zoo_dir)
            full = full_forward_ids(model, windows)
            as_forward = all(torch.equal(torch.sort(stored.ids[layer].long(), 1).values, full[layer].long())
                             for layer in stored.layers)
            print(f"{path}: {'matches' if same else 'DIFFERS from'} a regeneration; decode routing "
                  f"{'equals' if as_forward else 'DIFFERS from'} a full causal forward")
            failed += [] if same and as_forward else [name]
        else:
            save_trace(path, **rec)
            print(f"{path}: layers {sorted(rec['ids'])}, {next(iter(rec['ids'].values())).shape[0]} tokens each, "
                  f"{path.stat().st_size / 1024:.0f} KiB")
    if failed:
        raise SystemExit(f"traces differ from a regeneration: {', '.join(failed)}")


if __name__ == "__main__":
    main()
