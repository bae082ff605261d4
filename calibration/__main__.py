"""Calibrate expert similarity for a transformers MoE model and write the SERE artifact.

    python -m sere.calibration --model_path ./Qwen1.5-MoE-A2.7B \
        [--output_path DIR] [--data_path data.parquet|.jsonl|.txt] \
        [--similarity_method cka|cosine|frobenius|substitution] [--kernel linear|rbf|polynomial] \
        [--batch_size 8] [--max_len 512] [--max_tokens N] [--device cuda] [--dtype bfloat16]

(also installed as `sere-calibrate`). Writes DIR/sere_similarity.safetensors (one float32
[E, E] matrix per MoE layer, with metadata) and DIR/sere_similarity.png, and prints a
per-layer summary (and, last, the peak host and device memory). DIR defaults to the model
directory. Nothing is written on error, and an output folder the run created is removed again.
--max_len is cut to the model's context (max_position_embeddings); the model is read from its
files straight onto --device (sere.calibration.loading); without matplotlib the heatmap is
left out with a notice.
`substitution` is asymmetric and lies in [-1, 1] (sere.calibration.substitution).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch

from sere.artifact import ARTIFACT_FILENAME, ArtifactError, save_similarity
from sere.calibration.calibrate import DEFAULT_CKA_MAX_TOKENS, CalibrationError, calibrate
from sere.calibration.cka import KERNELS
from sere.calibration.data import DataError, read_texts, token_sequences
from sere.calibration.loading import load_model, load_tokenizer, resolve_device
from sere.calibration.memory import PeakMemory
from sere.calibration.metrics import METHODS
from sere.calibration.report import save_heatmap, summary_table
from sere.calibration.substitution import WEIGHTINGS, calibrate_substitution

MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek_v2")
HEATMAP_FILENAME = "sere_similarity.png"
RBF_EXACT_MAX_TOKENS = 16384  # beyond this, rbf CKA uses random Fourier features by default
RBF_DEFAULT_FEATURES = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sere-calibrate",
        description="Compute expert-similarity matrices of a transformers MoE model for SERE re-routing.",
    )
    p.add_argument("--model_path", required=True, help="directory of a transformers MoE model (config, weights, tokenizer)")
    p.add_argument("--model_type", choices=MODEL_TYPES, help="checked against the model config (default: read from it)")
    p.add_argument("--output_path", help="directory for sere_similarity.safetensors (default: --model_path)")
    p.add_argument(
        "--data_path",
        help="parquet with a `text` column, jsonl, or plain text (default: the shipped King James Bible extract)",
    )
    p.add_argument("--similarity_method", choices=METHODS, default="cka")
    p.add_argument("--kernel", choices=KERNELS, default="linear", help="CKA kernel (ignored by the other methods)")
    p.add_argument(
        "--substitution_weighting",
        choices=WEIGHTINGS,
        default="router",
        help="substitution: weight each routed token by the router's weight squared (router) or 1 (uniform)",
    )
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--max_len",
        type=int,
        default=512,
        help="tokens per sequence, cut to the model's context (max_position_embeddings); shorter texts are left out",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        help=f"tokens to calibrate on (default: {DEFAULT_CKA_MAX_TOKENS} for cka, which holds them all per layer; "
        "all the data for cosine/frobenius/substitution, which accumulate)",
    )
    p.add_argument(
        "--rbf_features",
        type=int,
        help=f"rbf CKA through this many random Fourier features; 0 = exact (default: exact up to "
        f"{RBF_EXACT_MAX_TOKENS} tokens, else {RBF_DEFAULT_FEATURES})",
    )
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="model dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    created: list[Path] = []  # output folders this run made: removed again unless it succeeds
    rc = 1
    try:
        rc = _run(args, created)
    except (CalibrationError, DataError, ArtifactError) as e:
        print(f"sere-calibrate: error: {e}", file=sys.stderr)
        rc = 2
    finally:
        if rc != 0:
            _remove_created(created)
    return rc


def _run(args: argparse.Namespace, created: list[Path]) -> int:
    for name in ("batch_size", "max_len", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CalibrationError(f"--{name} must be a positive integer, got {value}")
    if args.rbf_features is not None and args.rbf_features < 0:
        raise CalibrationError(f"--rbf_features must be >= 0, got {args.rbf_features}")
    device = resolve_device(args.device)
    peak = PeakMemory(device).start()
    try:
        _calibrate(args, device, created)
    finally:
        peak.stop()
    print(peak.line(), file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace, device: torch.device, created: list[Path]) -> None:
    model_path = Path(args.model_path)
    config = _load_config(model_path)
    model_type = getattr(config, "model_type", None)
    if args.model_type and args.model_type != model_type:
        raise CalibrationError(
            f"--model_type {args.model_type} contradicts the model config at {model_path} (model_type {model_type!r})"
        )
    max_len = _clamp_to_context(args.max_len, config)
    output_dir = Path(args.output_path) if args.output_path else model_path
    created.extend(_prepare_output(output_dir))

    source = read_texts(args.data_path)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    max_tokens = args.max_tokens or (DEFAULT_CKA_MAX_TOKENS if args.similarity_method == "cka" else None)

    tokenizer = load_tokenizer(model_path)
    max_sequences = None if max_tokens is None else -(-max_tokens // max_len)
    seqs = token_sequences(tokenizer, source.texts, max_len, max_sequences=max_sequences)
    tokens = seqs.ids.numel() if max_tokens is None else min(max_tokens, seqs.ids.numel())
    print(
        f"data: {source.source} ({len(source.texts)} texts); {seqs.ids.shape[0]} sequences of {max_len} tokens "
        f"from the first {seqs.scanned} texts ({seqs.too_short} shorter than --max_len left out); "
        f"calibrating on {tokens} tokens",
        file=sys.stderr,
    )
    rbf_features = _rbf_features(args, tokens)
    if args.similarity_method == "cka":
        note = f"; rbf through {rbf_features} random Fourier features" if rbf_features else ""
        print(f"cka ({args.kernel}{note}) holds at most {max_tokens} tokens per layer (--max_tokens)", file=sys.stderr)

    model, _ = load_model(model_path, device, dtype)
    if args.similarity_method == "substitution":
        result = calibrate_substitution(
            model,
            seqs.ids,
            weighting=args.substitution_weighting,
            batch_size=args.batch_size,
            max_tokens=max_tokens,
            progress=not args.no_progress,
        )
    else:
        result = calibrate(
            model,
            seqs.ids,
            method=args.similarity_method,
            kernel=args.kernel,
            batch_size=args.batch_size,
            max_tokens=max_tokens,
            rbf_features=rbf_features,
            progress=not args.no_progress,
        )
    metadata = {
        "model_type": model_type or "",
        "model_name": model_path.resolve().name,
        "method": args.similarity_method,
        "kernel": args.kernel if args.similarity_method == "cka" else "none",
        "rbf_features": str(rbf_features or "exact") if args.kernel == "rbf" else "none",
        "tokens": result.tokens,
        "max_len": max_len,
        "batch_size": args.batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "data_source": source.source,
        "data_sha256": source.sha256,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sere_version": _sere_version(),
    }
    if args.similarity_method == "substitution":  # asymmetric, in [-1, 1]: say how it was weighted
        metadata.update(weighting=args.substitution_weighting, value_range="[-1, 1]")
    missing = _matplotlib_missing()
    artifact, heatmap = _write_outputs(output_dir, result.matrices, metadata, heatmap=missing is None)
    print(summary_table(result.matrices))
    if heatmap is None:
        print(f"sere-calibrate: no heatmap ({missing}): pip install 'sere[calibration]' to get {HEATMAP_FILENAME}",
              file=sys.stderr)
        print(f"wrote {artifact}", file=sys.stderr)
    else:
        print(f"wrote {artifact} and {heatmap}", file=sys.stderr)


def _clamp_to_context(max_len: int, config) -> int:
    """--max_len, at most the model's context (max_position_embeddings), with a notice."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text_config, "max_position_embeddings", None)
    if isinstance(context, int) and not isinstance(context, bool) and 2 <= context < max_len:
        print(f"sere-calibrate: --max_len {max_len} exceeds the model's context of {context} tokens "
              f"(max_position_embeddings); using --max_len {context}", file=sys.stderr)
        return context
    return max_len


def _prepare_output(output_dir: Path) -> list[Path]:
    """Fail before any model work if the output directory cannot take our files; returns the
    folders it had to create (outermost first), which a failed run removes again."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CalibrationError(f"--output_path {output_dir} exists and is not a directory")
    missing = []
    probe = output_dir
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    missing.reverse()
    made: list[Path] = []
    try:
        for folder in missing:
            folder.mkdir()
            made.append(folder)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        _remove_created(made)
        raise CalibrationError(f"cannot write to --output_path {output_dir}: {e.strerror or e}") from None
    return made


def _remove_created(created: list[Path]) -> None:
    """Remove the folders this run created, innermost first, where they are still empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (someone else's files) or gone: leave it and what holds it
    created.clear()


def _matplotlib_missing() -> str | None:
    """None where the heatmap can be drawn, else why not (matplotlib is an optional extra)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return "matplotlib is not installed"
    return None


def _load_config(model_path: Path):
    from transformers import AutoConfig

    if not (model_path / "config.json").is_file():
        raise CalibrationError(f"no model at --model_path {model_path} (config.json not found)")
    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as e:
        raise CalibrationError(f"cannot read the model config at {model_path}: {e}") from None


def _rbf_features(args, tokens: int) -> int | None:
    if args.similarity_method != "cka" or args.kernel != "rbf":
        return None
    if args.rbf_features is not None:
        return args.rbf_features or None
    return RBF_DEFAULT_FEATURES if tokens > RBF_EXACT_MAX_TOKENS else None


def _write_outputs(output_dir: Path, matrices, metadata, *, heatmap: bool = True) -> tuple[Path, Path | None]:
    """Heatmap and artifact to temp files, then both renamed into place: all or nothing.
    Files are readable by all (0o666 less the umask), as files written with open() are:
    mkstemp alone would leave them 0600. Without a heatmap an older one is removed, so that
    the folder never shows a picture of another artifact."""
    mode = _file_mode()
    artifact, png = output_dir / ARTIFACT_FILENAME, output_dir / HEATMAP_FILENAME
    temps: list[str] = []
    try:
        if heatmap:
            fd, tmp_png = tempfile.mkstemp(prefix=".sere_similarity.", suffix=".png", dir=output_dir)
            os.close(fd)
            temps.append(tmp_png)
            save_heatmap(matrices, tmp_png, title=f"{metadata['model_name']}: {metadata['method']} similarity")
            os.chmod(tmp_png, mode)
        fd, tmp_art = tempfile.mkstemp(prefix=".sere_similarity.", suffix=".safetensors", dir=output_dir)
        os.close(fd)
        temps.append(tmp_art)
        save_similarity(tmp_art, matrices, metadata)  # validates; itself writes through a temp file
        os.chmod(tmp_art, mode)
        os.replace(tmp_art, artifact)
        if heatmap:
            os.replace(tmp_png, png)
        else:
            png.unlink(missing_ok=True)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return artifact, png if heatmap else None


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _sere_version() -> str:
    import sere

    return getattr(sere, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
