"""Tuning text: read it, tokenize it into one stream, cut the windows each batch size uses.

    data = read_texts(path_or_None)                  # TextData: texts, sha256, source
    stream = token_stream(tokenizer, data.texts)     # [N] int64, texts joined by EOS
    windows = tune_windows(stream, batch_size=16, seq_len=64, num_batches=2)   # [n, B, L]

Formats: .txt (and any other suffix): UTF-8 text, one text per paragraph (blank-line separated);
.jsonl / .json: one JSON object per line with a "text" field (other fields, e.g. "domain", are
kept for the report), or a bare JSON string; .parquet: a "text" column, read with pyarrow, or
pandas where pyarrow is missing. Without a path: the multi-domain sample shipped as package
data, `sere/harness/data/tune_sample.jsonl` (found through importlib.resources).

Windows are spread over the whole stream (evenly spaced, not the first N tokens), so a sample
sorted by domain still gives every batch windows of several domains; `fidelity.Composition`
then puts far-apart windows into one batch (window w -> batch w % n).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from sere.harness.fidelity import Composition

DEFAULT_DATA_PACKAGE = "sere.harness"
DEFAULT_DATA_NAME = "data/tune_sample.jsonl"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. In the beginning was the word."


class DataError(ValueError):
    """Tuning data that is missing, unreadable, empty or too short for the chosen windows."""


@dataclass
class TextData:
    texts: list[str]
    sha256: str  # of the file's bytes
    source: str  # the path read (or the package resource), for messages and metadata
    domains: list[str] = field(default_factory=list)  # per text, where the data says ("" if not)


def default_data_path() -> Path:
    """The shipped tuning sample (package data), as a file path."""
    ref = resources.files(DEFAULT_DATA_PACKAGE).joinpath(DEFAULT_DATA_NAME)
    return Path(str(ref))


def read_texts(path: str | Path | None = None) -> TextData:
    file = Path(path) if path is not None else default_data_path()
    if not file.is_file():
        what = "the shipped tuning sample" if path is None else "--data_path"
        raise DataError(f"{what} not found: {file}")
    raw = file.read_bytes()
    suffix = file.suffix.lower()
    domains: list[str] = []
    if suffix == ".parquet":
        texts = _parquet_texts(file)
    elif suffix in (".jsonl", ".json"):
        texts, domains = _jsonl_texts(file, raw)
    else:
        texts = [p.strip() for p in re.split(r"\n\s*\n", _decode(file, raw))]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    texts = [texts[i] for i in keep]
    domains = [domains[i] for i in keep] if domains else [""] * len(texts)
    if not texts:
        raise DataError(f"the tuning data {file} contains no text")
    return TextData(texts, hashlib.sha256(raw).hexdigest(), str(file), domains)


def _decode(file: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text ({e}); use .txt (UTF-8), .jsonl or .parquet") from None


def _jsonl_texts(file: Path, raw: bytes) -> tuple[list[str], list[str]]:
    texts, domains = [], []
    for n, line in enumerate(_decode(file, raw).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} line {n} is not JSON: {e}") from None
        domain = ""
        if isinstance(row, dict):
            if "text" not in row:
                raise DataError(f"{file} line {n} has no \"text\" field (keys: {sorted(row)})")
            domain = str(row.get("domain", ""))
            row = row["text"]
        if not isinstance(row, str):
            raise DataError(f"{file} line {n}: the text must be a string, got {type(row).__name__}")
        texts.append(row)
        domains.append(domain)
    return texts, domains


def _parquet_texts(file: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"cannot read parquet file {file}: {e}") from None
        columns = table.column_names
        if "text" not in columns:
            raise DataError(f"parquet file {file} has no \"text\" column (columns: {columns})")
        return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    try:
        import pandas as pd
    except ImportError:
        raise DataError(
            f"reading parquet ({file}) needs pyarrow or pandas, and neither is installed: "
            "pip install pyarrow (or give the text as .jsonl / .txt)"
        ) from None
    try:
        frame = pd.read_parquet(file)
    except Exception as e:
        raise DataError(f"cannot read parquet file {file} with pandas: {e}") from None
    if "text" not in frame.columns:
        raise DataError(f"parquet file {file} has no \"text\" column (columns: {list(frame.columns)})")
    return [t for t in frame["text"].tolist() if isinstance(t, str)]


# ---- tokens -------------------------------------------------------------------------------


def check_tokenizer(tokenizer, where: str) -> None:
    """A tokenizer transformers built from nothing (no tokenizer files in the folder) has an
    empty vocabulary and tokenizes everything to no ids: refuse it, naming the folder."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0)
    ids = tokenizer(PROBE_TEXT)["input_ids"]
    if not size or size <= 1 or not ids:
        raise DataError(
            f"no usable tokenizer in {where} (vocabulary of {size or 0} token(s); a test sentence gives "
            f"{len(ids)} ids): put the model's tokenizer files (tokenizer.json, tokenizer_config.json) there"
        )


def token_stream(tokenizer, texts: list[str], *, vocab_size: int | None = None) -> torch.Tensor:
    """[N] int64: every text's tokens, joined by the tokenizer's EOS id (where it has one).
    vocab_size: the model's; an id at or past it is refused (a tokenizer of another model)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        out.extend(ids)
        if eos is not None:
            out.append(int(eos))
    stream = torch.tensor(out, dtype=torch.long)
    if vocab_size is not None and stream.numel() and int(stream.max()) >= vocab_size:
        raise DataError(
            f"the tokenizer gives token id {int(stream.max())}, but the model's vocabulary has {vocab_size} "
            "entries: the tokenizer is not this model's"
        )
    return stream


def tune_windows(stream: torch.Tensor, *, batch_size: int, seq_len: int, num_batches: int) -> torch.Tensor:
    """[num_batches, batch_size, seq_len] token ids: `batch_size * num_batches` windows of
    `seq_len` tokens, evenly spaced over the stream, grouped by `fidelity.Composition` (window
    w goes to batch w % num_batches, so a batch holds far-apart windows)."""
    comp = Composition(batch_size=batch_size, seq_len=seq_len, num_windows=batch_size * num_batches)
    need = comp.num_windows
    available = stream.numel() // seq_len
    if available < need:
        raise DataError(
            f"the tuning text is too short: {stream.numel()} tokens give {available} windows of {seq_len}, "
            f"and batch size {batch_size} x {num_batches} batches needs {need} ({need * seq_len} tokens); "
            "give more text (--data_path) or lower --seq_len / --num_batches"
        )
    all_windows = stream[: available * seq_len].view(available, seq_len)  # A, L
    pick = torch.arange(need) * (available - 1) // max(need - 1, 1)  # evenly spaced, distinct
    return comp.batches(all_windows[pick].reshape(-1))  # n, B, L
