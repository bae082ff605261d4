"""Calibration text: read it, tokenize it into equal-length sequences, batch it.

    texts = read_texts(path_or_None)          # TextSource: texts, sha256, source name
    seqs = token_sequences(tokenizer, texts.texts, max_len=512).ids   # S, max_len int64

Formats: parquet (a `text` column), jsonl (one object per line with a `text` field, or a bare
JSON string), anything else is plain UTF-8 text split into paragraphs at blank lines. Without
a path, the King James Version extract shipped in calibration/data/ (see its README).
Every text shorter than max_len tokens is left out and counted; each kept text gives its
first max_len tokens (so batches need no padding).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "kjv_genesis.txt"


class DataError(ValueError):
    """Calibration data that is missing, empty, or unusable with the chosen settings."""


@dataclass
class TextSource:
    texts: list[str]
    sha256: str  # of the file's bytes
    source: str  # file name, for the metadata


def read_texts(path: str | Path | None = None) -> TextSource:
    file = Path(path) if path is not None else DEFAULT_DATA
    if not file.is_file():
        raise DataError(f"calibration data not found: {file}")
    raw = file.read_bytes()
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        texts = _parquet_texts(file)
    elif suffix in (".jsonl", ".json"):
        texts = _jsonl_texts(file, raw)
    else:
        texts = _paragraphs(_decode(file, raw))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"calibration data {file} contains no text")
    return TextSource(texts, hashlib.sha256(raw).hexdigest(), file.name)


def _decode(file: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text ({e}); use parquet, jsonl or UTF-8 text") from None


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text)]


def _parquet_texts(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet file {file}: {e}") from None
    if "text" not in table.column_names:
        raise DataError(f"parquet file {file} has no `text` column (columns: {table.column_names})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _jsonl_texts(file: Path, raw: bytes) -> list[str]:
    texts = []
    for n, line in enumerate(_decode(file, raw).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} line {n} is not JSON: {e}") from None
        if isinstance(row, dict):
            if "text" not in row:
                raise DataError(f"{file} line {n} has no `text` field (keys: {sorted(row)})")
            row = row["text"]
        if not isinstance(row, str):
            raise DataError(f"{file} line {n}: text must be a string, got {type(row).__name__}")
        texts.append(row)
    return texts


@dataclass
class TokenSequences:
    ids: torch.Tensor  # S, max_len int64
    scanned: int  # texts tokenized
    too_short: int  # of those, left out for having fewer than max_len tokens


def token_sequences(tokenizer, texts: list[str], max_len: int, *, max_sequences: int | None = None) -> TokenSequences:
    """The first max_len tokens of each text that has that many.

    Raises DataError when no text is long enough (naming the longest), instead of calibrating
    on nothing. Stops early once max_sequences are found.
    """
    if max_len < 2:
        raise DataError(f"--max_len must be at least 2 tokens, got {max_len}")
    kept: list[list[int]] = []
    longest = scanned = 0
    for text in texts:
        scanned += 1
        ids = tokenizer(text)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) >= max_len:
            kept.append(ids[:max_len])
            if max_sequences is not None and len(kept) >= max_sequences:
                break
    if not kept:
        raise DataError(
            f"none of the {len(texts)} texts has {max_len} tokens (the longest has {longest}); "
            "lower --max_len or use longer texts"
        )
    return TokenSequences(torch.tensor(kept, dtype=torch.long), scanned, scanned - len(kept))
