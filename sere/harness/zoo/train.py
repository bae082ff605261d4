"""Train one zoo model on the multi-domain corpus and write its checkpoint directory.

    python -m sere.harness.zoo.corpus --out .corpus                 # once: text, tokenizer, token streams
    sere-zoo-train --model qwen2_moe --data-dir .corpus --zoo-dir tests/zoo   # writes tests/zoo/qwen2_moe/
    python -m sere.harness.zoo.train --model qwen3_moe --data-dir .corpus --device cuda --steps 3000 --out /tmp/q3
    python -m sere.harness.zoo.train --model qwen2_dense --data-dir .corpus --out /tmp/dense   # then upcycle it:
    python -m sere.harness.zoo.train --model qwen2_moe_upcycled --data-dir .corpus --init-from /tmp/dense

The checkpoint goes to --out, else to <zoo folder>/<model> (--zoo-dir, else $SERE_ZOO_DIR;
one of the three must be given). Steps: read the token streams and tokenizer of the corpus
(--data-dir, sere.harness.zoo.tokens), train with AdamW (linear warm-up, cosine decay) on random
windows, each from a domain drawn uniformly, the load-balancing loss of the model family
included (bf16 autocast on CUDA, float32 master weights), then save the model in bf16
safetensors with its tokenizer and `train_log.json` (arguments, seed, steps, tokens, wall time,
loss curve, validation perplexity per domain along the way); the card is written afterwards by
sere.harness.zoo.card. Model selection: every --eval-every steps the perplexity on each domain's
validation split (never the held-out split) is measured; the weights saved are those of the
best geometric mean over domains (--select-best, on by default), and the run stops early after
--patience evaluations without improvement. `qwen2_moe_upcycled` starts from a trained
`qwen2_dense` (--init-from, sere.harness.zoo.upcycle) instead of random weights.
The run ends at --steps or after --max-minutes of wall time, whichever comes first; the
learning-rate schedule follows whichever is ahead (so a run cut short by a busy machine still
decays), and the log records the steps taken and every step's lr. Deterministic for a given
seed, device and thread count when the step count binds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sere.harness.zoo import ZooDirNotSet, zoo_dir
from sere.artifact import num_experts_of
from sere.harness.zoo.evaluate import heldout_perplexity
from sere.harness.zoo.models import (
    CHECKPOINT_DTYPE, DENSE_MODELS, MAX_CHECKPOINT_BYTES, ZOO_MODELS, build_model, count_parameters, zoo_config,
)
from sere.harness.zoo.tokens import load_streams, mean_perplexity, sample_mixed_batch, tokenizer_dir
from sere.harness.zoo.upcycle import DEFAULT_REINIT_FRACTION, upcycle, upcycle_record

UPCYCLED = "qwen2_moe_upcycled"

DEFAULT_DATA_DIR = Path(".corpus")
# Validation windows per domain at each evaluation (the splits hold ~20k tokens: all of it at 256).
VAL_WINDOWS = 96


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


def training_loss(model, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(loss to minimise, LM loss, load-balancing loss) on the batch x [B, L].

    Qwen2/3-MoE add their load-balancing loss to `loss` themselves; transformers' DeepSeek-V2
    returns none, so the same Switch-style loss is added here from its router logits (the
    real model is trained with an auxiliary balance loss too): without it a small router
    collapses onto a few experts and leaves nothing for re-routing to choose between."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    cfg = model.config
    if not hasattr(cfg, "num_experts_per_tok"):  # a dense model (qwen2_dense): no router, no balance loss
        out = model(input_ids=x, labels=x)
        return out.loss, float(out.loss.detach()), 0.0
    hooked: list[torch.Tensor] = []  # router logits caught on the way (transformers 5.17's DeepSeek-V2 returns none)
    hooks = [m.register_forward_hook(lambda mod, args, out: hooked.append(out[0]))  # out: (logits N,E, weights, ids)
             for name, m in model.named_modules() if name.endswith(".mlp.gate")]
    try:
        out = model(input_ids=x, labels=x, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    coef = cfg.router_aux_loss_coef
    if getattr(out, "aux_loss", None) is not None:
        aux = float(out.aux_loss.detach())
        return out.loss, float(out.loss.detach()) - coef * aux, aux
    router_logits = getattr(out, "router_logits", None) or tuple(hooked)
    if not router_logits:
        raise RuntimeError(f"{type(model).__name__} returned no router logits to balance")
    aux = load_balancing_loss_func(router_logits, num_experts_of(cfg), cfg.num_experts_per_tok)
    return out.loss + coef * aux, float(out.loss.detach()), float(aux.detach())


def initial_model(args, vocab_size: int):
    """(model in train mode on CPU, upcycling record or None): fresh weights, or for the
    upcycled model the trained dense model of --init-from split into experts."""
    impl = args.experts_impl or None
    if args.model != UPCYCLED:
        if args.init_from:
            raise ValueError(f"--init-from is for {UPCYCLED} only")
        return build_model(args.model, vocab_size=vocab_size, seed=args.seed, experts_implementation=impl), None
    if not args.init_from:
        raise ValueError(f"{UPCYCLED} starts from a trained qwen2_dense: give its directory with --init-from")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    cfg = zoo_config(UPCYCLED, vocab_size=vocab_size)
    n_shards = cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size
    moe = upcycle(dense, cfg, n_shards=n_shards, reinit_fraction=args.reinit_fraction, seed=args.seed,
                  experts_implementation=impl)
    record = upcycle_record(cfg, n_shards=n_shards, reinit_fraction=args.reinit_fraction, shuffle=True, seed=args.seed)
    record["dense_dir"] = str(args.init_from)
    dense_log = Path(args.init_from) / "train_log.json"
    if dense_log.exists():
        record["dense_log"] = {k: v for k, v in json.loads(dense_log.read_text()).items() if k != "curve"}
    return moe, record


def ensure_experts_kernel(model, x: torch.Tensor) -> str:
    """The expert kernel the model trains with: its configured one (transformers' default
    grouped_mm) if a forward and backward pass on x [B, L] runs, else "eager" (a grouped_mm
    without a float32 kernel on this device must not end a GPU run that cannot be watched)."""
    current = getattr(model.config, "_experts_implementation", None) or "none"
    if not hasattr(model.config, "num_experts_per_tok"):
        return "dense"
    try:
        training_loss(model, x)[0].backward()
        return current
    except (RuntimeError, NotImplementedError) as e:
        print(f"expert kernel {current!r} failed ({type(e).__name__}: {str(e)[:200]}); training with eager")
        model.set_experts_implementation("eager")
        return "eager"
    finally:
        model.zero_grad(set_to_none=True)


def output_dir(args) -> Path:
    """--out, else <zoo folder>/<model>; ZooDirNotSet when neither --out nor a zoo folder is given."""
    return Path(args.out) if args.out else zoo_dir(getattr(args, "zoo_dir", None)) / args.model


def train(args) -> Path:
    out_dir = output_dir(args)  # before training: a missing zoo folder must not cost a run
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # TF32 matmuls: the same float32 model, Hopper's tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args.data_dir))
    train_streams = load_streams(args.data_dir, "train")  # {domain: N_d}
    val_streams = {d: ids[: VAL_WINDOWS * args.seq_len] for d, ids in load_streams(args.data_dir, "validation").items()}
    streams = list(train_streams.values())
    train_tokens = sum(s.numel() for s in streams)

    model, upcycled = initial_model(args, len(tokenizer))
    model = model.to(device).train()
    # bf16 autocast on CUDA (Hopper's tensor cores), float32 master weights and optimiser state.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16 else contextlib.nullcontext()
    with amp:
        experts_kernel = ensure_experts_kernel(model, streams[0][: 2 * args.seq_len].view(2, -1).to(device))
    n_params = count_parameters(model)
    if n_params * 2 > MAX_CHECKPOINT_BYTES:
        raise ValueError(f"{args.model}: {n_params} parameters would not fit {MAX_CHECKPOINT_BYTES} bytes in bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)

    curve, evals, window, steps_done = [], [], [], 0
    best = {"val_ppl": math.inf, "step": -1, "state": None}
    stopped_by = "steps"
    start = time.time()
    bar = tqdm(range(args.steps), desc=f"train {args.model}", unit="step")
    for step in bar:
        progress = run_progress(step, args.steps, time.time() - start, args.max_minutes)
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, warmup=args.warmup, peak=args.lr)
        x = sample_mixed_batch(streams, args.batch, args.seq_len, gen).to(device)  # B, L
        with amp:
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
        if last and step + 1 < args.steps:
            stopped_by = "time"
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            with amp:
                per_domain = {d: heldout_perplexity(model, ids, args.seq_len, batch_size=64) for d, ids in val_streams.items()}
            val = mean_perplexity(per_domain)
            model.train()
            evals.append({"step": step, "val_ppl": round(val, 3),
                          "val_ppl_per_domain": {d: round(v, 2) for d, v in per_domain.items()},
                          "elapsed_s": round(time.time() - start, 1)})
            if val < best["val_ppl"]:
                best.update(val_ppl=val, step=step, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            elif args.patience and len([e for e in evals if e["step"] > best["step"]]) >= args.patience:
                stopped_by = f"patience ({args.patience} evaluations without a better validation perplexity)"
                last = True
        if last:
            break
    wall = time.time() - start
    if args.select_best and best["state"] is not None:
        model.load_state_dict(best["state"])

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").to(getattr(torch, CHECKPOINT_DTYPE)).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    size = (out_dir / "model.safetensors").stat().st_size
    log = {
        "model": args.model,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "steps_done": steps_done,
        "tokens_seen": steps_done * args.batch * args.seq_len,
        "train_tokens": train_tokens,
        "train_tokens_per_domain": {d: s.numel() for d, s in train_streams.items()},
        "precision": "bf16 autocast, float32 master weights" if device.type == "cuda" and args.bf16 else "float32",
        "wall_s": round(wall, 1),
        "stopped_by": stopped_by,
        "saved_step": best["step"] if args.select_best else steps_done - 1,
        "best_val_ppl": round(best["val_ppl"], 3),
        "validation_tokens": sum(v.numel() for v in val_streams.values()),
        "parameters": n_params,
        "checkpoint_bytes": size,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "experts_kernel": experts_kernel,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "heldout_evals": evals,
        **({"upcycle": upcycled} if upcycled else {}),
        "curve": curve,
    }
    (out_dir / "train_log.json").write_text(_dump_log(log))
    if size > MAX_CHECKPOINT_BYTES:
        raise RuntimeError(f"checkpoint is {size} bytes, over the {MAX_CHECKPOINT_BYTES} limit")
    print(f"saved {out_dir} ({size / 2**20:.2f} MB, {steps_done} steps, {wall / 60:.1f} min, "
          f"step {log['saved_step']} kept: validation ppl {best['val_ppl']:.2f}; stopped by {stopped_by})")
    return out_dir


def _dump_log(log: dict) -> str:
    """JSON with one line per loss-curve point (readable diffs, a small file)."""
    head = json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=1)[:-2]
    points = ",\n  ".join(json.dumps(p) for p in log["curve"])
    return f'{head},\n "curve": [\n  {points}\n ]\n}}\n'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=ZOO_MODELS + DENSE_MODELS)
    p.add_argument("--out", default=None, help="checkpoint directory (default: <zoo folder>/<model>)")
    p.add_argument("--zoo-dir", type=Path, default=None,
                   help="zoo folder the checkpoint goes into when --out is not given (default: $SERE_ZOO_DIR; "
                   "this repository's is tests/zoo)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="corpus folder (python -m sere.harness.zoo.corpus --out DIR): tokens/ and tokenizer/")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--select-best", action=argparse.BooleanOptionalAction, default=True,
                   help="save the weights of the best validation perplexity (default) instead of the last")
    p.add_argument("--patience", type=int, default=0, help="stop after this many evaluations without a better "
                   "validation perplexity (0: never)")
    p.add_argument("--init-from", type=Path, default=None, help=f"trained qwen2_dense directory ({UPCYCLED} only)")
    p.add_argument("--reinit-fraction", type=float, default=DEFAULT_REINIT_FRACTION,
                   help="share of each upcycled expert's neurons re-initialised (sere.harness.zoo.upcycle)")
    p.add_argument("--experts-impl", default="", help="transformers expert kernel (eager, grouped_mm; default: its own)")
    p.add_argument("--log-every", type=int, default=10, help="loss curve point = mean over this many steps")
    p.add_argument(
        "--max-minutes", type=float, default=6.0,
        help="wall-time budget: the schedule runs by time when this binds before --steps (inf: steps only)",
    )
    args = p.parse_args(argv)
    try:
        output_dir(args)
    except ZooDirNotSet as e:
        p.error(str(e))
    return args


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
