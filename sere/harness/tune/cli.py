"""`sere-tune`: measure what SERE costs on a MoE checkpoint and pick the cheapest setting
within a KL budget. (Also `python -m sere.harness.tune`.)

    sere-tune --model_path ./Qwen1.5-MoE-A2.7B [--similarity FILE] [--data_path text.jsonl] \
        [--batch_size 16 [64 ...]] [--settings "S=1,2 rho=0:0.9:0.1"] [--kl_budget 0.05] \
        [--seq_len 64 --num_batches 2] [--search_evals 48] [--device cuda --dtype bfloat16] \
        [--output_path DIR]

For each setting it runs the unmodified model and the re-routed one on the same token windows
batched the same way (SERE's decisions are per batch: the batch size tuned for is the serving
batch), and measures mean KL per token, top-1 agreement, perplexity ratio and mean distinct
experts per MoE layer and decode step, before and after (sere.harness.tune.measure). It then
searches (sere.harness.tune.search): the best uniform (S, rho) of the grid under the budget,
then a greedy per-layer descent of rho from it, every step measured. Output, in DIR (default:
the model folder), written all at once (nothing on error):
  sere_tuning.json          the chosen settings, accepted unchanged by
                            `sere.hf.enable(model, **json)` and by vLLM as
                            additional_config={"sere": json}; its "metadata" says what was
                            measured on what (model, artifact and data sha256, batch sizes,
                            budget, KL / experts of the choice, date, device, dtype)
  sere_tuning_results.json  every measurement
  sere_tuning.png           KL against activated experts, every setting, the chosen one marked
                            (skipped with a notice without matplotlib)
A table of the measurements goes to stdout; progress and notes to stderr. Bad input gives a
one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from sere.artifact import ARTIFACT_FILENAME, ArtifactError, artifact_path, load_similarity
from sere.harness.tune.data import DataError, check_tokenizer, read_texts, token_stream, tune_windows
from sere.harness.tune.measure import Measurement, measure, stock_reference
from sere.harness.tune.search import (
    DEFAULT_GRID,
    SEARCH_DESCRIPTION,
    PerLayerSearch,
    SearchError,
    best_feasible,
    closest,
    ladder_of,
    parse_grid,
)

PROG = "sere-tune"
TUNING_FILENAME = "sere_tuning.json"
RESULTS_FILENAME = "sere_tuning_results.json"
PLOT_FILENAME = "sere_tuning.png"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BUDGET = 0.05
DEFAULT_SEQ_LEN = 64
DEFAULT_NUM_BATCHES = 2
DEFAULT_SEARCH_EVALS = 48


class TuneError(ValueError):
    """Input sere-tune cannot work with (the message is the one-line error)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Measure SERE's fidelity on a transformers MoE model and choose the setting that activates "
        "the fewest experts within a KL budget.",
    )
    p.add_argument("--model_path", required=True, help="folder of a transformers MoE model (config, weights, tokenizer)")
    p.add_argument("--similarity", help=f"similarity artifact (default: {ARTIFACT_FILENAME} in --model_path)")
    p.add_argument("--data_path", help="text to tune on: .txt, .jsonl (a \"text\" field) or .parquet (a \"text\" "
                   "column); default: the multi-domain sample shipped with sere")
    p.add_argument("--batch_size", type=int, nargs="+", default=[16],
                   help="serving batch size(s) to tune for; the setting must meet the budget at each (default: 16)")
    p.add_argument("--settings", default=DEFAULT_GRID,
                   help=f"grid of uniform settings, e.g. \"S=1,2 rho=0,0.2,0.4\" or \"S=1 rho=0:0.8:0.1\" (default: {DEFAULT_GRID!r})")
    p.add_argument("--kl_budget", type=float, default=DEFAULT_BUDGET,
                   help=f"largest mean KL(stock || SERE) per token, nats, at every batch size (default: {DEFAULT_BUDGET})")
    p.add_argument("--seq_len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per window (default: {DEFAULT_SEQ_LEN})")
    p.add_argument("--num_batches", type=int, default=DEFAULT_NUM_BATCHES,
                   help=f"forward passes per batch size; windows = batch size x this (default: {DEFAULT_NUM_BATCHES})")
    p.add_argument("--search_evals", type=int, default=DEFAULT_SEARCH_EVALS,
                   help=f"measurements the per-layer search may spend; 0: uniform settings only (default: {DEFAULT_SEARCH_EVALS})")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--output_path", help="folder for sere_tuning.json and the plot (default: --model_path)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (TuneError, DataError, SearchError, ArtifactError) as e:
        message = " ".join(str(e).split())  # one line
        parser.exit(2, f"{PROG}: error: {message}\n")


# ---- the run ---------------------------------------------------------------------------------


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    _check_numbers(args)
    grid = parse_grid(args.settings)
    device = _device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_path = Path(args.model_path)
    output = Path(args.output_path) if args.output_path else model_path
    _check_output(output)
    config = _load_config(model_path)

    sites = _router_sites(config)  # on the meta device: no weights read yet
    top_k = _top_k(config)
    s_values = [s for s in grid.select_top_k if top_k is None or s < top_k]
    if top_k is not None and len(s_values) < len(grid.select_top_k):
        dropped = sorted(set(grid.select_top_k) - set(s_values))
        _note(f"{PROG}: leaving out S={','.join(map(str, dropped))}: the model routes each token to {top_k} experts, "
              f"and S >= {top_k} re-routes nothing")
    if not s_values:
        raise TuneError(f"--settings has no S below the model's {top_k} experts per token: nothing to tune")
    grid = type(grid)(tuple(s_values), grid.threshold)

    sim_file = artifact_path(args.similarity or model_path)
    art = _load_artifact(sim_file, config, sites) if sites is not None else None

    tokenizer = _load_tokenizer(model_path)
    data = read_texts(args.data_path)
    stream = token_stream(tokenizer, data.texts, vocab_size=getattr(config, "vocab_size", None))
    windows = {B: tune_windows(stream, batch_size=B, seq_len=args.seq_len, num_batches=args.num_batches)
               for B in sorted(set(args.batch_size))}
    domains = sorted({d for d in data.domains if d})
    where = f" ({_count(len(domains), 'domain')})" if domains else ""
    _note(f"data: {data.source}: {_count(len(data.texts), 'text')}{where}, "
          f"{stream.numel()} tokens; per batch size {args.num_batches} batches of B x {args.seq_len} tokens")

    model = _load_model(model_path, device, dtype)
    if sites is None:  # the meta build failed: find the routers on the loaded model
        sites = _routers_of(model)
        art = _load_artifact(sim_file, config, sites)
    layers = [s.layer for s in sites]
    sims = {layer: art.matrices[layer].to(device=device, dtype=torch.float32).contiguous() for layer in layers}
    _note(f"model: {model_path} ({type(model).__name__}, {len(layers)} MoE layers, "
          f"{sites[0].num_experts} experts, top-{top_k}) on {device} in {str(dtype).removeprefix('torch.')}; "
          f"similarity: {art.path}")

    progress = _progress_factory(args.no_progress)
    refs = {}
    for B in progress(list(windows), desc="stock model", unit="batch size"):
        refs[B] = stock_reference(model, windows[B])

    measured: list[Measurement] = []
    for setting in progress(grid.settings(), desc="grid", unit="setting"):
        measured.append(measure(model, sims, refs, setting, stage="grid"))
    best = best_feasible(measured, args.kl_budget)
    if best is None:
        print(results_table(measured, args.kl_budget, None, None))
        near = closest(measured)
        raise SearchError(
            f"no setting meets --kl_budget {args.kl_budget:g}: the closest is {near.setting.label()} with KL "
            f"{near.kl:.4g} ({_per_batch_kl(near)}); raise the budget or add settings with a larger S or rho"
        )

    ladder = ladder_of(measured)
    evals_bar = progress(total=args.search_evals if len(ladder) > 1 else 0, desc="per-layer search", unit="setting")
    search = PerLayerSearch(
        lambda s: measure(model, sims, refs, s, stage="per-layer"), layers, ladder, args.kl_budget,
        args.search_evals, on_eval=lambda m: evals_bar.update(1), known=measured,
    )
    chosen = search.run(best)
    evals_bar.close()
    searched = [m for m in search.cache.values() if m.stage != "grid"]

    print(results_table(measured + search.path, args.kl_budget, best, chosen))
    print(per_layer_table(chosen, refs))
    print(_summary(chosen, best, search, args.kl_budget))

    tuning = tuning_json(chosen, art.path, args, model_path=model_path, config=config, data=data,
                         stream_tokens=stream.numel(), best=best, evals=len(measured) + search.evals,
                         device=device, dtype=dtype)
    _check_accepted(tuning)
    results = {"grid": grid.describe(), "kl_budget": args.kl_budget, "chosen": chosen.as_dict(),
               "best_uniform": best.as_dict(), "search": SEARCH_DESCRIPTION,
               "stock": {str(B): {"nll": r.nll, "experts": r.experts,
                                  "experts_per_layer": {str(k): v for k, v in r.experts_per_layer.items()}}
                         for B, r in refs.items()},
               "measurements": [m.as_dict() for m in measured + searched]}
    files: dict[str, Callable[[Path], None]] = {
        TUNING_FILENAME: lambda p: p.write_text(json.dumps(tuning, indent=2) + "\n"),
        RESULTS_FILENAME: lambda p: p.write_text(json.dumps(results, indent=2) + "\n"),
    }
    from sere.harness.tune.plot import matplotlib_available, pareto_plot

    if matplotlib_available():
        title = f"{model_path.resolve().name}: sere-tune (budget {args.kl_budget:g})"
        files[PLOT_FILENAME] = lambda p: pareto_plot(measured + searched, chosen, args.kl_budget, p, title=title)
    else:
        _note(f"{PROG}: matplotlib is not installed: no Pareto plot ({PLOT_FILENAME}); pip install matplotlib for it")
    write_outputs(output, files)
    _note(f"wrote {', '.join(str(output / name) for name in files)}")
    return 0


def _check_numbers(args) -> None:
    if any(b < 1 for b in args.batch_size):
        raise TuneError(f"--batch_size must be positive, got {args.batch_size}")
    if args.seq_len < 2:
        raise TuneError(f"--seq_len must be at least 2 (a position and its next token), got {args.seq_len}")
    if args.num_batches < 1:
        raise TuneError(f"--num_batches must be positive, got {args.num_batches}")
    if not (math.isfinite(args.kl_budget) and args.kl_budget >= 0):
        raise TuneError(f"--kl_budget must be a finite number >= 0, got {args.kl_budget}")
    if args.search_evals < 0:
        raise TuneError(f"--search_evals must be >= 0, got {args.search_evals}")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _per_batch_kl(m: Measurement) -> str:
    return ", ".join(f"batch {B}: {pb.kl:.4g}" for B, pb in sorted(m.per_batch.items()))


# ---- inputs ------------------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise TuneError(f"--device {name!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TuneError(f"--device {name}, but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise TuneError(f"--device {name} cannot be used: {e}") from None
    return device


def _existing_anchor(path: Path) -> Path:
    """`path` if it exists, else its nearest existing ancestor."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def _check_output(output: Path) -> None:
    """Fail before any model work if the output folder cannot take our files (writes nothing)."""
    if output.exists() and not output.is_dir():
        raise TuneError(f"--output_path {output} exists and is not a folder")
    anchor = _existing_anchor(output)
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise TuneError(f"cannot write to --output_path {output} ({anchor} is not a writable folder)")


def _load_config(model_path: Path):
    from transformers import AutoConfig

    if not (model_path / "config.json").is_file():
        raise TuneError(f"no model at --model_path {model_path} (config.json not found)")
    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as e:
        raise TuneError(f"cannot read the model config at {model_path}: {e}") from None


def _routers_of(model):
    from sere.hf import find_routers

    try:
        sites = find_routers(model)
    except ValueError as e:
        raise TuneError(f"cannot find the MoE routers of {type(model).__name__}: {e}") from None
    if not sites:
        raise TuneError(
            f"no supported MoE router in {type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): "
            "sere-tune needs MoE blocks whose router is a *TopKRouter or a `gate` beside `experts` "
            "(Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, Mixtral, OLMoE, ...)"
        )
    return sites


def _router_sites(config):
    """The MoE routers, found on the model built on the meta device (no memory, no weights);
    None when the model cannot be built that way (then they are found after loading)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    return _routers_of(model)


def _top_k(config) -> int | None:
    k = getattr(config, "num_experts_per_tok", None)
    return k if isinstance(k, int) and k > 0 else None


def _load_artifact(file: Path, config, sites):
    counts = {s.num_experts for s in sites}
    art = load_similarity(file, config=config, expected_num_experts=next(iter(counts)) if len(counts) == 1 else None,
                          expected_layers=[s.layer for s in sites])
    for s in sites:
        shape = tuple(art.matrices[s.layer].shape)
        if shape != (s.num_experts, s.num_experts):
            raise ArtifactError(f"{file}: layer {s.layer} has a {shape} similarity, but its router has {s.num_experts} experts")
    return art


def _load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a missing or bad tokenizer
        raise TuneError(f"cannot load a tokenizer from {model_path}: {type(e).__name__}: {e}") from None
    check_tokenizer(tokenizer, str(model_path))
    return tokenizer


def _load_model(model_path: Path, device: torch.device, dtype):
    """The calibration command's loader (sere.calibration.loading.load_model): on an accelerator
    the weights go from the shards straight onto it, read without a memory map, so host memory
    stays far below the model's size."""
    from sere.calibration.loading import load_model

    try:
        model, _ = load_model(model_path, device, dtype)
    except (OSError, ValueError) as e:
        raise TuneError(f"cannot load the model at {model_path}: {e}") from None
    return model


def _progress_factory(disabled: bool):
    from tqdm.auto import tqdm

    def progress(iterable=None, **kw):
        return tqdm(iterable, file=sys.stderr, disable=disabled, dynamic_ncols=True, **kw)

    return progress


# ---- outputs -----------------------------------------------------------------------------------


def _fmt_kl(x: float) -> str:
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def _fmt_share(x: float) -> str:
    return f"{100 * x:.1f}%"


def results_table(measured: list[Measurement], budget: float, best: Measurement | None,
                  chosen: Measurement | None) -> str:
    from tabulate import tabulate

    rows = []
    step = 0
    for m in measured:
        if m.stage == "grid":
            label = m.setting.label()
        else:
            step += 1
            label = f"per-layer step {step}: {m.setting.label()}"
            if len(label) > 60:
                label = f"per-layer step {step} ({_count(len(m.setting.layer_settings), 'layer override')})"
        mark = "<- chosen" if m is chosen else ("<- best uniform" if m is best else "")
        for B, pb in sorted(m.per_batch.items()):
            rows.append([label, B, _fmt_kl(pb.kl), f"{pb.top1_agreement:.3f}", f"{pb.ppl_ratio:.4f}",
                         f"{pb.experts_before:.2f}", f"{pb.experts_after:.2f}", _fmt_share(pb.share),
                         "yes" if pb.kl <= budget else "no", mark])
    headers = ["setting", "batch", "KL", "top-1", "ppl ratio", "experts stock", "experts SERE", "share",
               "<= budget", ""]
    return tabulate(rows, headers=headers, tablefmt="simple")


def per_layer_table(chosen: Measurement, refs) -> str:
    from tabulate import tabulate

    layers = sorted(next(iter(refs.values())).experts_per_layer)
    rows = []
    for layer in layers:
        S, rho = chosen.setting.of_layer(layer)
        row = [layer, S, f"{rho:g}"]
        for B, ref in sorted(refs.items()):
            before = ref.experts_per_layer.get(layer, float("nan"))
            after = chosen.per_batch[B].experts_after_per_layer.get(layer, float("nan"))
            row += [f"{before:.2f}", f"{after:.2f}"]
        rows.append(row)
    headers = ["layer", "S", "rho"]
    for B in sorted(refs):
        headers += [f"stock (batch {B})", f"SERE (batch {B})"]
    return "chosen setting per MoE layer (distinct experts per decode step):\n" + tabulate(rows, headers=headers)


def _summary(chosen: Measurement, best: Measurement, search: PerLayerSearch, budget: float) -> str:
    lines = [f"best uniform: {best.setting.label()}: KL {best.kl:.4g}, experts {_fmt_share(best.share)} of stock"]
    if chosen is best:
        lines.append(f"per-layer search ({_count(search.evals, 'measurement')}): no per-layer step kept; chosen = best uniform")
    else:
        lines.append(f"per-layer search ({_count(search.evals, 'measurement')}, {_count(len(search.path), 'step')} kept): "
                     f"{chosen.setting.label()}")
    lines.append(f"chosen: KL {chosen.kl:.4g} <= budget {budget:g}; activated experts {_fmt_share(chosen.share)} "
                 f"of stock ({_per_batch_kl(chosen)})")
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict:
    import transformers

    import sere

    return {"sere": getattr(sere, "__version__", "unknown"), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def tuning_json(chosen: Measurement, similarity: Path, args, *, model_path: Path, config, data, stream_tokens: int,
                best: Measurement, evals: int, device, dtype) -> dict:
    """The chosen settings as sere.SereConfig fields, with the metadata riding along."""
    out = chosen.setting.as_dict()
    out["similarity"] = str(Path(similarity).resolve())
    out["metadata"] = {
        "tool": PROG,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(model_path.resolve()), "name": model_path.resolve().name,
                  "model_type": getattr(config, "model_type", None),
                  "architectures": list(getattr(config, "architectures", None) or [])},
        "similarity_sha256": _sha256(Path(similarity)),
        "data": {"path": str(Path(data.source).resolve()), "sha256": data.sha256, "texts": len(data.texts), "tokens": stream_tokens},
        "batch_sizes": sorted(chosen.per_batch),
        "seq_len": args.seq_len,
        "num_batches": args.num_batches,
        "kl_budget": args.kl_budget,
        "measured": {
            "kl": chosen.kl,
            "experts_share": chosen.share,
            "per_batch": {str(B): {k: v for k, v in pb.as_dict().items() if k != "experts_after_per_layer"}
                          for B, pb in sorted(chosen.per_batch.items())},
        },
        "best_uniform": {**best.setting.as_dict(), "kl": best.kl, "experts_share": best.share},
        "settings_grid": args.settings,
        "search": SEARCH_DESCRIPTION,
        "evaluations": evals,
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": _versions(),
    }
    return out


def _check_accepted(tuning: dict) -> None:
    """What we write must parse as SERE settings exactly as vLLM will read it."""
    from sere.config import SereConfig

    SereConfig.from_dict(json.loads(json.dumps(tuning)), source=PROG)


def write_outputs(output: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Write every file into a temporary folder beside (or inside) `output`, then move them in:
    on any error nothing reaches `output`, and no folder is left behind."""
    anchor = output if output.is_dir() else _existing_anchor(output)
    tmp = Path(tempfile.mkdtemp(prefix=".sere_tuning.", dir=anchor))
    try:
        for name, write in files.items():
            write(tmp / name)
        if output.is_dir():
            for name in files:
                os.replace(tmp / name, output / name)
            tmp.rmdir()
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
