"""Training text of the zoo: the King James Bible from Debian, split by chapter, and its tokenizer.

    python -m sere.harness.zoo.data --out /tmp/sere-kjv      # fetch, split, write train.txt / heldout.txt

Source: the Debian packages `bible-kjv-text` (the compressed text, /usr/lib/bible.data) and
`bible-kjv` (the `bible` program that prints it), fetched with `apt-get download` (no root
needed, no install) and unpacked with `dpkg-deb -x`. The KJV text (1611) is out of copyright;
the Bible Retrieval System files are "provided for unrestricted use" (Chip Chapin, 1989) and
the Debian packaging is GPL-2+. See tests/zoo/DATA.md.

Split: whole chapters, so no held-out verse has its neighbours in training. Chapters are
numbered 0..1188 in canonical order; chapter c is held out when c % HELDOUT_EVERY ==
HELDOUT_OFFSET (19 chapters, about 1.5 % of the text, spread over the whole book). The
offset keeps every chapter of Genesis (chapters 0-49) in training: Genesis is the project's
default calibration text (calibration/data/kjv_genesis.txt), so calibration never sees
held-out text.
Text layout: one verse per line (the reference "Ge1:1" dropped), a blank line between chapters.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HELDOUT_EVERY = 64
HELDOUT_OFFSET = 57
# Validation (model selection while training, sere.harness.zoo.train): chapter j of the *training*
# text (0..1170) when j % VALIDATION_EVERY == VALIDATION_OFFSET; 18 chapters, none of Genesis.
# Kept apart from the held-out text, so choosing the best step does not tune on what the
# metrics are measured on.
VALIDATION_EVERY = 64
VALIDATION_OFFSET = 60
DEFAULT_VOCAB = 2048
EOS_TOKEN = "<|endoftext|>"
_VERSE_LINE = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str


def fetch_kjv(cache_dir: str | Path) -> Path:
    """Path of `kjv.txt` (one "Ge1:1 text" line per verse) under cache_dir, fetched from the
    Debian packages on first use. Needs apt-get, dpkg-deb and a package mirror."""
    cache_dir = Path(cache_dir).resolve()  # the commands below run in a temporary cwd
    out = cache_dir / "kjv.txt"
    if out.exists() and out.stat().st_size > 4_000_000:
        return out
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the zoo's text comes from Debian packages (see tests/zoo/DATA.md)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        run = lambda *cmd: subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True)  # noqa: E731
        try:
            run("apt-get", "download", "bible-kjv-text", "bible-kjv")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"apt-get download failed (run `apt-get update` first?): {e.stderr.strip()}") from e
        for deb in Path(tmp).glob("*.deb"):
            run("dpkg-deb", "-x", deb.name, "root")
        root = Path(tmp) / "root"
        shutil.copy(root / "usr/share/doc/bible-kjv-text/copyright", cache_dir / "copyright")
        # The whole book, one verse per line (-f turns pretty-printing off).
        text = run(str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21").stdout
    verses = parse_verses(text)
    if len(verses) != 31102:
        raise RuntimeError(f"expected the 31102 verses of the KJV, the package printed {len(verses)}")
    out.write_text(text)
    return out


def parse_verses(text: str) -> list[Verse]:
    """Verses of `bible -f` output ("Ge1:1 In the beginning ..."); other lines are skipped."""
    verses = []
    for line in text.splitlines():
        m = _VERSE_LINE.match(line.strip())
        if m:
            verses.append(Verse(m["book"], int(m["chapter"]), int(m["verse"]), m["text"].strip()))
    return verses


def chapters(verses: list[Verse]) -> list[list[Verse]]:
    """Verses grouped by chapter, in canonical order."""
    out: list[list[Verse]] = []
    for v in verses:
        if not out or (out[-1][0].book, out[-1][0].chapter) != (v.book, v.chapter):
            out.append([])
        out[-1].append(v)
    return out


def is_heldout(chapter_index: int) -> bool:
    return chapter_index % HELDOUT_EVERY == HELDOUT_OFFSET


def chapters_to_text(chs: list[list[Verse]]) -> str:
    return "\n\n".join("\n".join(v.text for v in ch) for ch in chs) + "\n"


def split_text(verses: list[Verse]) -> tuple[str, str, list[str]]:
    """(train text, held-out text, held-out chapter names like "Ge32")."""
    chs = chapters(verses)
    held = [ch for i, ch in enumerate(chs) if is_heldout(i)]
    train = [ch for i, ch in enumerate(chs) if not is_heldout(i)]
    names = [f"{ch[0].book}{ch[0].chapter}" for ch in held]
    return chapters_to_text(train), chapters_to_text(held), names


def split_validation(train_text: str) -> tuple[str, str]:
    """(text to train on, validation text): whole chapters of the training text (chapters are
    separated by blank lines, see chapters_to_text), every VALIDATION_EVERY-th one held back."""
    chs = train_text.strip("\n").split("\n\n")
    keep = [c for j, c in enumerate(chs) if j % VALIDATION_EVERY != VALIDATION_OFFSET]
    val = [c for j, c in enumerate(chs) if j % VALIDATION_EVERY == VALIDATION_OFFSET]
    if not val:
        raise ValueError(f"{len(chs)} chapters leave none for validation (every {VALIDATION_EVERY}th from {VALIDATION_OFFSET})")
    return "\n\n".join(keep) + "\n", "\n\n".join(val) + "\n"


def train_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB):
    """A byte-level BPE tokenizer trained on `text`, as a transformers fast tokenizer
    (so AutoTokenizer loads it from a model directory). Its only special token is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def encode(tokenizer, text: str):
    """The whole text as one 1-D int64 token tensor (chapters are separated by blank lines,
    no special tokens in between)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)  # N


def prepare(out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB) -> dict:
    """Fetch the KJV into out_dir, write train.txt, heldout.txt and tokenizer/; return paths."""
    out_dir = Path(out_dir)
    verses = parse_verses(fetch_kjv(out_dir).read_text())
    train, held, names = split_text(verses)
    (out_dir / "train.txt").write_text(train)
    (out_dir / "heldout.txt").write_text(held)
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(train, vocab_size).save_pretrained(tok_dir)
    return {"train": out_dir / "train.txt", "heldout": out_dir / "heldout.txt", "tokenizer": tok_dir, "heldout_chapters": names}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="cache directory for the text, split and tokenizer")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    args = p.parse_args(argv)
    info = prepare(args.out, args.vocab_size)
    for key, value in info.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
