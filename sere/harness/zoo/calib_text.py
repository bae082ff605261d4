"""Turn a shipped calibration text into calibration documents of even length (jsonl).

    python -m sere.harness.zoo.calib_text calibration/data/multidomain_mix.txt /tmp/mix.jsonl

The calibration command reads plain text as paragraphs split at blank lines and leaves out
every paragraph shorter than --max_len tokens: source code and manual pages, whose
paragraphs are a few lines, would then hardly be calibrated on. Cut into pieces of about
`chars` characters at line ends instead (order kept, nothing dropped but the short tail), so
every domain of the mix reaches the model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_CHARS = 1600


def pieces(text: str, chars: int = DEFAULT_CHARS) -> list[str]:
    """Consecutive runs of whole lines of at least `chars` characters (the tail, if shorter, is dropped)."""
    out, buf, size = [], [], 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= chars:
            out.append("".join(buf))
            buf, size = [], 0
    return out


def write_jsonl(src: str | Path, dst: str | Path, chars: int = DEFAULT_CHARS) -> int:
    docs = pieces(Path(src).read_text(encoding="utf-8"), chars)
    Path(dst).write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return len(docs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--chars", type=int, default=DEFAULT_CHARS)
    a = p.parse_args(argv)
    print(f"{a.dst}: {write_jsonl(a.src, a.dst, a.chars)} documents")


if __name__ == "__main__":
    main()
