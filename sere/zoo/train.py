"""Train one zoo model on the King James Bible and write its checkpoint directory.

    python -m sere.zoo.train --model qwen2_moe                  # CPU, writes tests/zoo/qwen2_moe/
    python -m sere.zoo.train --model qwen3_moe --device cuda --steps 2000 --out /tmp/q3

Steps: fetch and split the text (sere.zoo.data; cached in --data-dir), train the shared BPE
tokenizer once, train with AdamW (linear warm-up, cosine decay) on random windows of the
training split, the load-balancing loss of the model family included, then save the model in
fp16 safetensors with its tokenizer, `train_log.json` (arguments, seed, steps, wall time, loss
curve, held-out loss along the way) and `README.md` (the card, see sere.zoo.card).
The run ends at --steps or after --max-minutes of wall time, whichever comes first; the
learning-rate schedule follows whichever is ahead (so a run cut short by a busy machine still
decays), and the log records the steps taken and every step's lr. Deterministic for a given
seed, device and thread count when the step count binds.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sere.zoo import zoo_dir
from sere.zoo.data import encode, prepare
from sere.zoo.evaluate import heldout_perplexity
from sere.model_configs import num_experts_of
from sere.zoo.models import MAX_CHECKPOINT_BYTES, ZOO_MODELS, build_model, count_parameters

DEFAULT_DATA_DIR = Path.home() / ".cache" / "sere" / "kjv"


def lr_at(progress: float, *, warmup: float, peak: float, floor: float = 0.1) -> float:
    """Learning rate at `progress` in [0, 1] of the run: linear warm-up over the first
    `warmup` fraction, then cosine decay to floor * peak at the end."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    decay = (progress - warmup) / max(1e-9, 1 - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0))))


def run_progress(step: int, steps: int, elapsed_s: float, max_minutes: float) -> float:
    """How far the run is, in [0, 1]: by steps, or by wall time when --max-minutes binds
    first (a busy shared CPU), so the schedule still ends with its decay. The log records
    the lr of every step, so a time-bound run's schedule is known exactly afterwards."""
    by_time = elapsed_s / (max_minutes * 60) if math.isfinite(max_minutes) else 0.0
    return min(1.0, max(step / steps, by_time))


def sample_batch(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `seq_len` tokens from the 1-D stream `ids`."""
    starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)  # B
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # B, L


def training_loss(model, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(loss to minimise, LM loss, load-balancing loss) on the batch x [B, L].

    Qwen2/3-MoE add their load-balancing loss to `loss` themselves; transformers' DeepSeek-V2
    returns none, so the same Switch-style loss is added here from its router logits (the
    real model is trained with an auxiliary balance loss too): without it a small router
    collapses onto a few experts and leaves nothing for re-routing to choose between."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    cfg = model.config
    out = model(input_ids=x, labels=x, output_router_logits=True)
    coef = cfg.router_aux_loss_coef
    if getattr(out, "aux_loss", None) is not None:
        aux = float(out.aux_loss.detach())
        return out.loss, float(out.loss.detach()) - coef * aux, aux
    if not out.router_logits:
        raise RuntimeError(f"{type(model).__name__} returned no router logits to balance")
    aux = load_balancing_loss_func(out.router_logits, num_experts_of(cfg), cfg.num_experts_per_tok)
    return out.loss + coef * aux, float(out.loss.detach()), float(aux.detach())


def train(args) -> Path:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = prepare(args.data_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    train_ids = encode(tokenizer, Path(paths["train"]).read_text())  # N
    held_ids = encode(tokenizer, Path(paths["heldout"]).read_text())  # N'

    model = build_model(args.model, vocab_size=len(tokenizer), seed=args.seed).to(device).train()
    n_params = count_parameters(model)
    if n_params * 2 > MAX_CHECKPOINT_BYTES:
        raise ValueError(f"{args.model}: {n_params} parameters would not fit {MAX_CHECKPOINT_BYTES} bytes in fp16")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)

    curve, evals, window, steps_done = [], [], [], 0
    start = time.time()
    bar = tqdm(range(args.steps), desc=f"train {args.model}", unit="step")
    for step in bar:
        progress = run_progress(step, args.steps, time.time() - start, args.max_minutes)
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, warmup=args.warmup, peak=args.lr)
        x = sample_batch(train_ids, args.batch, args.seq_len, gen).to(device)  # B, L
        loss, lm_loss, aux = training_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append((lm_loss, aux))
        if (step + 1) % args.log_every == 0:  # the curve: means over the last log_every steps
            curve.append({"step": step, "loss": round(sum(w[0] for w in window) / len(window), 4),
                          "aux_loss": round(sum(w[1] for w in window) / len(window), 4),
                          "lr": float(f"{group['lr']:.4g}"), "elapsed_s": round(time.time() - start, 1)})
            window.clear()
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
        steps_done = step + 1
        last = step + 1 == args.steps or run_progress(step + 1, args.steps, time.time() - start, args.max_minutes) >= 1
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            ppl = heldout_perplexity(model, held_ids[: 64 * args.seq_len], args.seq_len)
            model.train()
            evals.append({"step": step, "heldout_ppl_subset": round(ppl, 3)})
        if last:
            break
    wall = time.time() - start

    out_dir = Path(args.out) if args.out else zoo_dir() / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    size = (out_dir / "model.safetensors").stat().st_size
    log = {
        "model": args.model,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "steps_done": steps_done,
        "tokens_seen": steps_done * args.batch * args.seq_len,
        "train_tokens": train_ids.numel(),
        "wall_s": round(wall, 1),
        "parameters": n_params,
        "checkpoint_bytes": size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "heldout_evals": evals,
        "curve": curve,
    }
    (out_dir / "train_log.json").write_text(_dump_log(log))
    _sync_heldout(Path(paths["heldout"]), out_dir.parent)
    if size > MAX_CHECKPOINT_BYTES:
        raise RuntimeError(f"checkpoint is {size} bytes, over the {MAX_CHECKPOINT_BYTES} limit")
    print(f"saved {out_dir} ({size / 2**20:.2f} MB, {steps_done} steps, {wall / 60:.1f} min)")
    return out_dir


def _dump_log(log: dict) -> str:
    """JSON with one line per loss-curve point (readable diffs, a small file)."""
    head = json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=1)[:-2]
    points = ",\n  ".join(json.dumps(p) for p in log["curve"])
    return f'{head},\n "curve": [\n  {points}\n ]\n}}\n'


def _sync_heldout(heldout: Path, zoo: Path) -> None:
    """Keep one held-out text per zoo: copy it there, or check it is the one already there
    (a different split would leak training text into the held-out numbers)."""
    target = zoo / "heldout.txt"
    if not target.exists():
        shutil.copy(heldout, target)
    elif target.read_text() != heldout.read_text():
        raise RuntimeError(f"{target} differs from this run's held-out split ({heldout}); refusing to mix them")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=ZOO_MODELS)
    p.add_argument("--out", default=None, help="checkpoint directory (default tests/zoo/<model>)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="cache for the text and tokenizer")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10, help="loss curve point = mean over this many steps")
    p.add_argument(
        "--max-minutes", type=float, default=6.0,
        help="wall-time budget: the schedule runs by time when this binds before --steps (inf: steps only)",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
