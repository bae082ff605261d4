"""Calibrate expert similarity for a transformers MoE model and write the SERE artifact.

    python -m sere.calibration --model_path ./Qwen1.5-MoE-A2.7B \
        [--output_path DIR] [--data_path data.parquet|.jsonl|.txt] \
        [--similarity_method cka|cosine|frobenius|substitution] [--kernel linear|rbf|polynomial] \
        [--batch_size 8] [--max_len 512] [--max_tokens N] [--device cuda] [--dtype bfloat16]

(also installed as `sere-calibrate`). Writes DIR/sere_similarity.safetensors (one float32
[E, E] matrix per MoE layer, with metadata) and DIR/sere_similarity.png, and prints a
per-layer summary. DIR defaults to the model directory. Nothing is written on error.
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
    p.add_argument("--max_len", type=int, default=512, help="tokens per sequence; shorter texts are left out")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="model dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (CalibrationError, DataError, ArtifactError) as e:
        print(f"sere-calibrate: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    for name in ("batch_size", "max_len", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CalibrationError(f"--{name} must be a positive integer, got {value}")
    if args.rbf_features is not None and args.rbf_features < 0:
        raise CalibrationError(f"--rbf_features must be >= 0, got {args.rbf_features}")
    model_path = Path(args.model_path)
    output_dir = Path(args.output_path) if args.output_path else model_path
    _check_writable(output_dir)

    config = _load_config(model_path)
    model_type = getattr(config, "model_type", None)
    if args.model_type and args.model_type != model_type:
        raise CalibrationError(
            f"--model_type {args.model_type} contradicts the model config at {model_path} (model_type {model_type!r})"
        )

    source = read_texts(args.data_path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    max_tokens = args.max_tokens or (DEFAULT_CKA_MAX_TOKENS if args.similarity_method == "cka" else None)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot load a tokenizer from {model_path}: {e}") from None
    max_sequences = None if max_tokens is None else -(-max_tokens // args.max_len)
    seqs = token_sequences(tokenizer, source.texts, args.max_len, max_sequences=max_sequences)
    tokens = seqs.ids.numel() if max_tokens is None else min(max_tokens, seqs.ids.numel())
    print(
        f"data: {source.source} ({len(source.texts)} texts); {seqs.ids.shape[0]} sequences of {args.max_len} tokens "
        f"from the first {seqs.scanned} texts ({seqs.too_short} shorter than --max_len left out); "
        f"calibrating on {tokens} tokens",
        file=sys.stderr,
    )
    rbf_features = _rbf_features(args, tokens)
    if args.similarity_method == "cka":
        note = f"; rbf through {rbf_features} random Fourier features" if rbf_features else ""
        print(f"cka ({args.kernel}{note}) holds at most {max_tokens} tokens per layer (--max_tokens)", file=sys.stderr)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
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
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "data_source": source.source,
        "data_sha256": source.sha256,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sere_version": _sere_version(),
    }
    if args.similarity_method == "substitution":  # asymmetric, in [-1, 1]: say how it was weighted
        metadata.update(weighting=args.substitution_weighting, value_range="[-1, 1]")
    artifact, heatmap = _write_outputs(output_dir, result.matrices, metadata)
    print(summary_table(result.matrices))
    print(f"wrote {artifact} and {heatmap}", file=sys.stderr)
    return 0


def _check_writable(output_dir: Path) -> None:
    """Fail before any model work if the output directory cannot take our files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CalibrationError(f"--output_path {output_dir} exists and is not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise CalibrationError(f"cannot write to --output_path {output_dir}: {e.strerror or e}") from None


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


def _write_outputs(output_dir: Path, matrices, metadata) -> tuple[Path, Path]:
    """Heatmap to a temp file, artifact atomically, then the heatmap renamed: all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=".sere_similarity.", suffix=".png", dir=output_dir)
    os.close(fd)
    heatmap = output_dir / HEATMAP_FILENAME
    try:
        save_heatmap(matrices, tmp, title=f"{metadata['model_name']}: {metadata['method']} similarity")
        artifact = save_similarity(output_dir / ARTIFACT_FILENAME, matrices, metadata)
        os.replace(tmp, heatmap)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return artifact, heatmap


def _sere_version() -> str:
    import sere

    return getattr(sere, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
