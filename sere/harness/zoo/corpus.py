"""Multi-domain training corpus of the zoo, its splits, its tokenizer and its manifest.

    python -m sere.harness.zoo.corpus --out DIR                  # fetch, split, tokenizer, tokens, manifest
    python -m sere.harness.zoo.corpus --out DIR --export REPO    # also write the committed files into REPO
    python -m sere.harness.zoo.corpus --out DIR --texts-only     # the text splits only (determinism check)

Writes DIR/debs/*.deb (the packages, pinned in corpus_sources.PACKAGES), DIR/{train,validation,
heldout}/<domain>.txt, DIR/heldout/en_fortunes.txt (the family no model trains on),
DIR/tokenizer/ (byte-level BPE, 12,288 tokens, trained on the training split only),
DIR/tokens/<split>/<domain>.npy (uint16) and DIR/manifest.json. Nothing random: documents are
ranked by sha256("<domain>\\0<name>") and dealt in that order to the held-out split (about
80 KB), then validation (about 60 KB), then training (up to TRAIN_CAP bytes); each split keeps
its documents in source order. In a .txt split the documents are joined by "<|endoftext|>", so
tokenizing the file gives exactly its .npy: documents' tokens separated by the EOS id.
Sources and licences: corpus_sources.py and tests/zoo/DATA.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from sere.harness.zoo import corpus_sources as src
from sere.harness.zoo import data as kjv_data
from sere.harness.zoo.corpus_sources import Doc

VOCAB_SIZE = 12288
EOS = kjv_data.EOS_TOKEN
TRAIN_CAP = 4_000_000  # bytes of UTF-8 per training domain
HELDOUT_TARGET, HELDOUT_MAX = 80_000, 100_000
VALIDATION_TARGET, VALIDATION_MAX = 60_000, 80_000
SPLIT_DOC_MAX = 24_000  # a larger document goes to training (or nowhere), never to held-out/validation
TRAIN_DOC_MAX = 250_000  # so no single document is more than ~6 % of its domain
SPLITS = ("train", "validation", "heldout")
NEVER_TRAINED = "en_fortunes"
CAL_CHUNK, CAL_PER_DOMAIN, CAL_MIX_PER_DOMAIN = 4000, 15, 5
TUNE_PER_DOMAIN, TUNE_MIN, TUNE_MAX = 8, 1000, 2500

_EN_EXCLUDE = (  # technical (near the training domains), ASCII art, song lyrics, dated ethnic/gender jokes
    r"^(ascii-art|translate-me|computers|linux|linuxcookie|debian|perl|songs-poems|ethnic|men-women)$",
)
# domain: (packages, package whose /usr/share/doc/<it>/copyright holds the licence, licence line quoted from it, what)
DOMAINS = {
    "kjv": (["bible-kjv-text", "bible-kjv"], "bible-kjv-text",
            "Users may copy, modify or distribute this file at will.", "King James Bible, one chapter per document"),
    "pydoc": (["python3.11-doc"], "python3.11-doc", "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",
              "Python 3.11 documentation, reStructuredText sources (_sources/**/*.rst.txt), one page per document"),
    "pycode": (["libpython3.11-stdlib"], "libpython3.11-minimal", "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",
               "Python 3.11 standard library, /usr/lib/python3.11/**/*.py, one file per document"),
    "perl": (["perl-modules-5.36"], "perl-modules-5.36", "License: GPL-1+ or Artistic",
             "Perl 5.36 core modules, /usr/share/perl/5.36.0/**/*.pm except unicore/, one file per document"),
    "man": (["manpages", "manpages-dev"], "manpages", "License: GPL-2+",
            "Linux man-pages 6.03 (sections 1-8) as plain text, one page per document"),
    "de": (["fortunes-de"], "fortunes-de", "License: GPL-2+", "German fortunes except asciiart"),
    "es": (["fortunes-es"], "fortunes-es", "All fortunes' text and quotes are presumed to be in the public domain.",
           "Spanish fortunes except the offensive section off/"),
    "it": (["fortunes-it"], "fortunes-it", "Consider this package freeware (public domain).", "Italian fortunes"),
    "ru": (["fortunes-ru"], "fortunes-ru", "License: GPL-2", "Russian fortunes"),
    "zh": (["fortunes-zh"], "fortunes-zh", "License: GPL-3.0+", "Chinese fortunes: sayings, Tang and Song poems"),
    NEVER_TRAINED: (["fortunes", "fortunes-min"], "fortunes", "This program falls under the BSD copyright:",
                    "English fortunes (held-out only, never trained on), technical files, lyrics and ethnic/gender jokes left out"),
}


def log(msg: str, t0: float = time.monotonic()) -> None:
    print(f"[corpus {time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rank(domain: str, docs: list[Doc]) -> list[Doc]:
    return sorted(docs, key=lambda d: sha256(f"{domain}\0{d.name}".encode()))


def nbytes(doc: Doc) -> int:
    return len(doc.text.encode())


def split_docs(domain: str, docs: list[Doc]) -> dict[str, list[Doc]]:
    """{split: documents in source order}; see the module docstring. KJV keeps the chapter
    split of sere.harness.zoo.data (held-out chapters c % 64 == 57, validation every 64th of the
    rest from 60), and all of Genesis, the default calibration text, stays in training."""
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    fixed = domain == "kjv"  # held-out and validation chapters fixed by index; only training is dealt
    if fixed:
        held = [kjv_data.is_heldout(int(d.name[:4])) for d in docs]
        out["heldout"] = [d for d, h in zip(docs, held) if h]
        rest = [d for d, h in zip(docs, held) if not h]
        is_val = [j % kjv_data.VALIDATION_EVERY == kjv_data.VALIDATION_OFFSET for j in range(len(rest))]
        out["validation"] = [d for d, v in zip(rest, is_val) if v]
        pool = [d for d, v in zip(rest, is_val) if not v]
        genesis = [d for d in pool if d.name.split()[1].startswith("Ge")]
        order = genesis + rank(domain, [d for d in pool if d not in genesis])
    else:
        order = rank(domain, docs)
    chosen: dict[str, str] = {}
    for d in order:
        n = nbytes(d)
        if not fixed and n <= SPLIT_DOC_MAX and size["heldout"] < HELDOUT_TARGET and size["heldout"] + n <= HELDOUT_MAX:
            split = "heldout"
        elif (not fixed and domain != NEVER_TRAINED and n <= SPLIT_DOC_MAX and size["validation"] < VALIDATION_TARGET
              and size["validation"] + n <= VALIDATION_MAX):
            split = "validation"
        elif domain != NEVER_TRAINED and n <= TRAIN_DOC_MAX and size["train"] + n <= TRAIN_CAP:
            split = "train"
        else:
            continue
        chosen[d.name] = split
        size[split] += n
    for d in docs:  # source order
        if d.name in chosen:
            out[chosen[d.name]].append(d)
    return out


def build_texts(out: Path, debs: dict[str, Path]) -> dict:
    """Unpack, read every source, split; write the .txt splits; return {domain: info}."""
    roots = {name: src.unpack(deb, out / "root") for name, deb in debs.items()}
    for stale in (*SPLITS, "tokens"):
        shutil.rmtree(out / stale, ignore_errors=True)
    fort = lambda pkg, sub, *exclude: lambda sk: src.fortunes(roots[pkg] / "usr/share/games/fortunes" / sub, sk, exclude)  # noqa: E731
    readers = {
        "kjv": lambda sk: src.kjv(out / "kjv"),
        "pydoc": lambda sk: src.pydoc(roots["python3.11-doc"], sk),
        "pycode": lambda sk: src.pycode(roots["libpython3.11-stdlib"], sk),
        "perl": lambda sk: src.perl(roots["perl-modules-5.36"], sk),
        "man": lambda sk: src.man([roots["manpages"], roots["manpages-dev"]], sk),
        "de": fort("fortunes-de", "de", r"^asciiart$"),
        "es": fort("fortunes-es", "es", r"^off/"),
        "it": fort("fortunes-it", "it"),
        "ru": fort("fortunes-ru", "ru"),
        "zh": fort("fortunes-zh", ""),
        NEVER_TRAINED: lambda sk: src.fortunes(roots["fortunes"] / "usr/share/games/fortunes", sk, _EN_EXCLUDE)
        + src.fortunes(roots["fortunes-min"] / "usr/share/games/fortunes", sk, _EN_EXCLUDE),
    }
    info = {}
    for domain, (pkgs, lic_pkg, licence, what) in DOMAINS.items():
        copyright_text = (roots[lic_pkg] / "usr/share/doc" / lic_pkg / "copyright").read_text()
        if " ".join(licence.split()) not in " ".join(copyright_text.split()):
            raise RuntimeError(f"{domain}: licence line {licence!r} not found in {lic_pkg}'s copyright file")
        skipped: list[str] = []
        docs = readers[domain](skipped)
        if any(EOS in d.text for d in docs):
            raise RuntimeError(f"{domain}: a document contains {EOS}")
        splits = split_docs(domain, docs)
        info[domain] = {"packages": {p: package_info(debs[p]) for p in pkgs}, "licence_file": f"/usr/share/doc/{lic_pkg}/copyright",
                        "licence": licence, "what": what, "documents": len(docs), "skipped_not_utf8": skipped,
                        "splits": {}, "_docs": splits}
        for split, chosen in splits.items():
            if not chosen:
                continue
            data = EOS.join(d.text for d in chosen).encode()
            path = out / split / f"{domain}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            entry = {"documents": len(chosen), "bytes": len(data), "sha256": sha256(data)}
            if split != "train":
                entry["names"] = [d.name for d in chosen]
            info[domain]["splits"][split] = entry
        sizes = ", ".join(f"{s} {e['bytes']:,} B/{e['documents']} docs" for s, e in info[domain]["splits"].items())
        log(f"{domain}: {len(docs)} documents -> {sizes}")
    return info


def package_info(deb: Path) -> dict:
    return {"version": src.deb_field(deb, "Version"), "deb": deb.name, "deb_sha256": src.sha256_file(deb)}


def calibration_sets(info: dict) -> dict[str, list[Doc]]:
    """{training domain: CAL_PER_DOMAIN texts of about CAL_CHUNK bytes} from the training split:
    the non-blank lines (a calibration .txt is split at blank lines) of the first CAL_CHUNK bytes
    of each training document in rank order, run together and cut after CAL_CHUNK bytes, so a
    text holds one long document or a few short ones (fortunes); named "doc+doc+..."."""
    out = {}
    for domain, d in info.items():
        if domain == NEVER_TRAINED:
            continue
        texts: list[Doc] = []
        lines: list[str] = []
        names: list[str] = []
        n = 0
        for doc in rank(domain, d["_docs"]["train"]):
            names.append(doc.name)
            m = 0
            for line in doc.text.split("\n"):
                if line.strip() and m < CAL_CHUNK and n < CAL_CHUNK:
                    lines.append(line)
                    m += len(line.encode()) + 1
                    n += len(line.encode()) + 1
            if n >= CAL_CHUNK:
                texts.append(Doc("+".join(names), "\n".join(lines)))
                lines, names, n = [], [], 0
            if len(texts) == CAL_PER_DOMAIN:
                break
        out[domain] = texts
    return out


def tune_sample(info: dict) -> list[dict]:
    """TUNE_PER_DOMAIN excerpts (whole lines, TUNE_MIN..TUNE_MAX bytes) of held-out documents per domain."""
    rows = []
    for domain, d in info.items():
        k = 0
        for doc in rank(domain, d["_docs"]["heldout"]):
            lines, n = [], 0
            for line in doc.text.split("\n"):
                if n + len(line.encode()) + 1 > TUNE_MAX:
                    break
                lines.append(line)
                n += len(line.encode()) + 1
            text = "\n".join(lines).strip("\n") + "\n"
            if len(text.encode()) >= TUNE_MIN and k < TUNE_PER_DOMAIN:
                rows.append({"domain": domain, "doc": doc.name, "text": text})
                k += 1
    return rows


def train_and_tokenize(out: Path, info: dict) -> dict:
    import numpy as np

    text = "".join(doc.text for domain, d in info.items() if domain != NEVER_TRAINED for doc in d["_docs"]["train"])
    log(f"training the tokenizer ({VOCAB_SIZE} tokens) on {len(text.encode()):,} bytes of training text")
    tok = kjv_data.train_tokenizer(text, VOCAB_SIZE)
    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok.save_pretrained(tok_dir)
    backend, eos_id = tok.backend_tokenizer, tok.convert_tokens_to_ids(EOS)
    for domain, d in info.items():
        for split, docs in d["_docs"].items():
            if not docs:
                continue
            ids: list[int] = []
            for i, enc in enumerate(backend.encode_batch([doc.text for doc in docs], add_special_tokens=False)):
                ids.extend(([eos_id] if i else []) + enc.ids)
            arr = np.asarray(ids, dtype=np.uint16)
            path = out / "tokens" / split / f"{domain}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, arr)
            d["splits"][split].update(tokens=len(arr), tokens_sha256=src.sha256_file(path))
        log(f"{domain}: " + ", ".join(f"{s} {e['tokens']:,} tokens" for s, e in d["splits"].items()))
    return {"vocab_size": len(tok), "eos_token": EOS, "eos_id": eos_id,
            "files": {p.name: src.sha256_file(p) for p in sorted(tok_dir.iterdir())}}


def export(out: Path, repo: Path, manifest: dict, cal: dict, tune: list[dict]) -> None:
    """The committed files: held-out texts + manifest, tokenizer, calibration texts, tune sample."""
    held = repo / "tests/zoo/heldout"
    held.mkdir(parents=True, exist_ok=True)
    for f in sorted((out / "heldout").glob("*.txt")):
        shutil.copy(f, held / f.name)
    (held / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    shutil.rmtree(repo / "tests/zoo/tokenizer", ignore_errors=True)
    shutil.copytree(out / "tokenizer", repo / "tests/zoo/tokenizer")
    for rel, data in calibration_files(cal).items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    (repo / "sere/harness/data").mkdir(parents=True, exist_ok=True)
    (repo / "sere/harness/data/tune_sample.jsonl").write_bytes(tune_bytes(tune))
    log(f"exported into {repo}")


def calibration_files(cal: dict) -> dict[str, bytes]:
    files = {f"calibration/data/domains/{dom}.txt": ("\n\n".join(t.text for t in texts) + "\n").encode() for dom, texts in cal.items()}
    mix = [cal[dom][i].text for i in range(CAL_MIX_PER_DOMAIN) for dom in cal]  # round robin over the domains
    files["calibration/data/multidomain_mix.txt"] = ("\n\n".join(mix) + "\n").encode()
    return files


def tune_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def build(out: str | Path, *, texts_only: bool = False, repo: str | Path | None = None) -> dict:
    out = Path(out).resolve()
    t0 = time.monotonic()
    log(f"fetching {len(src.PACKAGES)} pinned packages into {out / 'debs'}")
    debs = src.fetch_debs(out / "debs")
    info = build_texts(out, debs)
    cal, tune = calibration_sets(info), tune_sample(info)
    manifest = {
        "corpus": "sere.harness.zoo.corpus", "document_separator": EOS, "never_trained": [NEVER_TRAINED],
        "train_cap_bytes": TRAIN_CAP, "domains": {k: {kk: vv for kk, vv in v.items() if kk != "_docs"} for k, v in info.items()},
        "calibration": {dom: [t.name for t in texts] for dom, texts in cal.items()},
        "calibration_sha256": {rel: sha256(b) for rel, b in calibration_files(cal).items()},
        "tune_sample_sha256": sha256(tune_bytes(tune)),
    }
    if not texts_only:
        manifest["tokenizer"] = train_and_tokenize(out, info)
        manifest["domains"] = {k: {kk: vv for kk, vv in v.items() if kk != "_docs"} for k, v in info.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    if repo is not None:
        export(out, Path(repo), manifest, cal, tune)
    log(f"done in {time.monotonic() - t0:.0f} s: {out / 'manifest.json'}")
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working directory (packages, texts, tokenizer, tokens, manifest)")
    p.add_argument("--texts-only", action="store_true", help="stop after the text splits (no tokenizer, no tokens)")
    p.add_argument("--export", metavar="REPO", help="write the committed files (held-out texts, tokenizer, calibration, tune sample) into this checkout")
    args = p.parse_args(argv)
    if args.texts_only and args.export:
        p.error("--export needs the tokenizer: leave out --texts-only")
    build(args.out, texts_only=args.texts_only, repo=args.export)


if __name__ == "__main__":
    main()
