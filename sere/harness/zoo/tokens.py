"""The zoo's training tokens: one token stream per domain and split, as the corpus command wrote them.

    streams = load_streams(".corpus", "train")      # {"kjv": LongTensor N, "pycode": ..., ...}
    x = sample_mixed_batch(list(streams.values()), batch=64, seq_len=256, gen=gen)

`python -m sere.harness.zoo.corpus --out DIR` writes DIR/tokens/<split>/<domain>.npy (uint16,
documents separated by the end-of-text id) and DIR/tokenizer/. Training reads only these, so
the offline GPU host needs DIR/tokens and DIR/tokenizer, not the packages.
Domains are sampled uniformly per window, whatever their size: the corpus caps each training
domain, but the smaller ones (es, zh) would still be seen less under size-proportional sampling.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SPLITS = ("train", "validation", "heldout")


def tokenizer_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir) / "tokenizer"
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {path}: build the corpus with `python -m sere.harness.zoo.corpus --out {data_dir}`")
    return path


def load_streams(data_dir: str | Path, split: str) -> dict[str, torch.Tensor]:
    """{domain: 1-D int64 token stream} of one split, domains in name order."""
    import numpy as np

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    folder = Path(data_dir) / "tokens" / split
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"no token files in {folder}: build the corpus with `python -m sere.harness.zoo.corpus --out {data_dir}`")
    return {f.stem: torch.from_numpy(np.load(f).astype(np.int64)) for f in files}


def sample_mixed_batch(streams: list[torch.Tensor], batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` windows of `seq_len` tokens [B, L]: each row picks a domain uniformly, then a
    random window inside that domain's stream."""
    too_short = [i for i, s in enumerate(streams) if s.numel() <= seq_len]
    if too_short:
        raise ValueError(f"streams {too_short} have no window of {seq_len} tokens")
    domains = torch.randint(0, len(streams), (batch,), generator=gen).tolist()
    rows = []
    for d in domains:
        start = int(torch.randint(0, streams[d].numel() - seq_len, (1,), generator=gen))
        rows.append(streams[d][start : start + seq_len])
    return torch.stack(rows)  # B, L


def mean_perplexity(per_domain: dict[str, float]) -> float:
    """Geometric mean of per-domain perplexities (each domain weighs the same)."""
    return math.exp(sum(math.log(p) for p in per_domain.values()) / len(per_domain))
