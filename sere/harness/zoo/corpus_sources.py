"""Sources of the multi-domain corpus (sere.harness.zoo.corpus): one function per Debian package
family, each returning whole documents as `Doc(name, text)` in sorted-name order.

Packages are fetched at pinned versions with `apt-get download NAME=VERSION` into a cache
folder (as root, stale package lists are refreshed once when a pin is missing) and unpacked with
`dpkg-deb -x` (nothing installed); the King James Bible
comes through sere.harness.zoo.data.fetch_kjv. Every text is plain UTF-8, newlines "\\n", each
document ending in exactly one "\\n". Manual pages are turned from roff into plain text here
(`roff_to_text`), deterministically and without groff. Licences: tests/zoo/DATA.md.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sere.harness.zoo import data as kjv_data

# Pinned versions (Debian 12 "bookworm"): the corpus is rebuilt byte for byte from these.
PACKAGES = {
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",  # only for its copyright file (stdlib's doc dir links there)
    "perl-modules-5.36": "5.36.0-7+deb12u4",
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "fortunes-de": "0.35-1",
    "fortunes-es": "1.36",
    "fortunes-it": "1.99-4.1",
    "fortunes-ru": "1.52-3.1",
    "fortunes-zh": "2.98",
    "fortunes": "1:1.99.1-7.3",
    "fortunes-min": "1:1.99.1-7.3",
}


@dataclass(frozen=True)
class Doc:
    name: str
    text: str


def fetch_debs(debs_dir: Path, names=None) -> dict[str, Path]:
    """{package: .deb path} under debs_dir, downloaded at the pinned version when missing."""
    debs_dir = Path(debs_dir).resolve()
    debs_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names or PACKAGES:
        version = PACKAGES[name]
        found = [p for p in sorted(debs_dir.glob(f"{name}_*.deb")) if deb_field(p, "Version") == version]
        if not found:
            if shutil.which("apt-get") is None:
                raise RuntimeError("apt-get not found: the corpus comes from Debian packages (tests/zoo/DATA.md)")
            try:
                apt_download(name, version, debs_dir)
            except subprocess.CalledProcessError as e:
                raise RuntimeError(
                    f"apt-get download {name}={version} failed (run `apt-get update`; if the mirror no longer has this "
                    f"version, update PACKAGES in {__name__} and rebuild: the sha256s will change): {e.stderr.strip()}"
                ) from e
            found = [p for p in sorted(debs_dir.glob(f"{name}_*.deb")) if deb_field(p, "Version") == version]
        out[name] = found[0]
    return out


_lists_updated = False


def apt_download(name: str, version: str, debs_dir: Path) -> None:
    """`apt-get download NAME=VERSION`; when that fails and this process runs as root, the package
    lists are refreshed once (`apt-get update`: a fresh machine's lists often predate a security
    release that the pins name) and the download tried again. SERE_APT_UPDATE=0 turns that off."""
    global _lists_updated
    cmd = ["apt-get", "download", f"{name}={version}"]
    try:
        subprocess.run(cmd, cwd=debs_dir, check=True, capture_output=True, text=True)
        return
    except subprocess.CalledProcessError:
        may_update = (not _lists_updated and os.environ.get("SERE_APT_UPDATE", "1") != "0"
                      and hasattr(os, "geteuid") and os.geteuid() == 0)
        if not may_update:
            raise
    _lists_updated = True
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, text=True)
    subprocess.run(cmd, cwd=debs_dir, check=True, capture_output=True, text=True)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True).stdout.strip()


def unpack(deb: Path, root: Path) -> Path:
    """The package's files under root/<package> (unpacked once)."""
    dest = Path(root) / deb.name.split("_")[0]
    if not (dest / ".unpacked").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
        (dest / ".unpacked").touch()
    return dest


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def clean(text: str) -> str:
    """Newlines "\\n", no trailing spaces at line ends, no blank lines at either end, one final "\\n"."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return text + "\n" if text else ""


def _files(root: Path, pattern: str, exclude=()) -> list[tuple[str, Path]]:
    """(relative name, path) of the regular files under root matching pattern, sorted; no symlinks."""
    out = []
    for p in root.rglob(pattern):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and not any(re.search(x, rel) for x in exclude):
            out.append((rel, p))
    return sorted(out)


def _utf8_docs(files, skipped: list[str]) -> list[Doc]:
    docs = []
    for rel, p in files:
        try:
            text = clean(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if text:
            docs.append(Doc(rel, text))
    return docs


# --- one function per source -------------------------------------------------------------------

def kjv(cache_dir: Path) -> list[Doc]:
    """The 1,189 chapters of the King James Bible in canonical order, one verse per line
    (via sere.harness.zoo.data); names "000 Ge1" .. "1188 Re22" (index first: the split uses it)."""
    verses = kjv_data.parse_verses(kjv_data.fetch_kjv(cache_dir).read_text())
    chs = kjv_data.chapters(verses)
    return [Doc(f"{i:04d} {ch[0].book}{ch[0].chapter}", "\n".join(v.text for v in ch) + "\n") for i, ch in enumerate(chs)]


def pydoc(root: Path, skipped: list[str]) -> list[Doc]:
    """The Python 3.11 documentation in its reStructuredText source (Sphinx `_sources`), one
    document per page (`library/os.rst`)."""
    base = root / "usr/share/doc/python3.11/html/_sources"
    return [Doc(d.name.removesuffix(".txt"), d.text) for d in _utf8_docs(_files(base, "*.rst.txt"), skipped)]


def pycode(root: Path, skipped: list[str]) -> list[Doc]:
    """The `.py` files of the Python 3.11 standard library in libpython3.11-stdlib, one per file."""
    return _utf8_docs(_files(root / "usr/lib/python3.11", "*.py"), skipped)


def perl(root: Path, skipped: list[str]) -> list[Doc]:
    """The Perl 5.36 core modules (`.pm` files, with their embedded POD), one per file; the
    generated Unicode tables (unicore/) are left out."""
    return _utf8_docs(_files(root / "usr/share/perl/5.36.0", "*.pm", exclude=(r"^unicore/",)), skipped)


def man(roots: list[Path], skipped: list[str]) -> list[Doc]:
    """The Linux man-pages (manpages: sections 1, 4-8; manpages-dev: 2 and 3) as plain text,
    one per page (`man2/open.2`); pages that only alias another one (`.so`) are left out."""
    docs = []
    for root in roots:
        for rel, p in _files(root / "usr/share/man", "*.gz"):
            raw = gzip.decompress(p.read_bytes())
            try:
                src = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            if re.match(r"\s*\.so\s", src):
                continue
            text = clean(roff_to_text(src))
            if text:
                docs.append(Doc(rel.removesuffix(".gz"), text))
    return sorted(docs, key=lambda d: d.name)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
FORTUNE_CHUNK = 2048  # bytes: consecutive fortunes of one file are grouped into documents of about this size


def fortunes(base: Path, skipped: list[str], exclude=()) -> list[Doc]:
    """Fortune cookie files (one cookie between `%` lines) under base, as documents of
    consecutive cookies of one file, about FORTUNE_CHUNK bytes each (`zitate#12`), cookies
    separated by a blank line; terminal colour codes and backspace overstrikes removed."""
    docs = []
    for rel, p in _files(base, "*", exclude=(r"\.dat$", r"\.u8$", *exclude)):
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        text = _CONTROL.sub("", re.sub(r".\x08", "", _ANSI.sub("", text)))
        cookies = [c for c in (clean(c) for c in re.split(r"^%[ \t]*$", text, flags=re.M)) if c]
        chunk: list[str] = []
        size = 0
        for c in cookies:
            chunk.append(c)
            size += len(c.encode())
            if size >= FORTUNE_CHUNK:
                docs.append(Doc(f"{rel}#{len(docs)}", "\n".join(chunk)))
                chunk, size = [], 0
        if chunk:
            docs.append(Doc(f"{rel}#{len(docs)}", "\n".join(chunk)))
    return docs


# --- roff to plain text ------------------------------------------------------------------------

_NAMED = {
    "em": "—", "en": "–", "hy": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥",
    "!=": "≠", "->": "→", "<-": "←", "de": "°", "ha": "^", "ti": "~", "ga": "`", "sh": "#", "rs": "\\",
    "bv": "|", "ba": "|", "or": "|", "ul": "_", "at": "@", "sl": "/", "pl": "+", "mi": "−", "eq": "=",
    "lh": "☜", "rh": "☞", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "ss": "ß", "ae": "æ", "oe": "œ",
    "a\"": "ä", "o\"": "ö", "u\"": "ü", "A\"": "Ä", "O\"": "Ö", "U\"": "Ü", "e'": "é", "e`": "è",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "ct": "¢", "Po": "£", "Eu": "€",
    "R": "®", "Tm": "™", "Lq": "“", "Rq": "”",
}
_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"          # font change
    r"|s[+-]?(?:\[[^\]]*\]|\(..|\d)"    # size change
    r"|\*(?:\[(?P<s1>[^\]]*)\]|\((?P<s2>..)|(?P<s3>.))"   # string
    r"|\((?P<n2>..)|\[(?P<n1>[^\]]*)\]"  # named character
    r"|[nkgmM](?:\[[^\]]*\]|\(..|.)"    # registers, colours
    r"|[hvwolxLNDbXYZAR]'[^']*'"        # motions and the like
    r"|[zc&|^%:dutp{}]|\"(?P<rest>.*)"  # zero-width or comment
    r"|(?P<ch>.))"
)
_KEEP = {"e": "\\", "\\": "\\", "-": "-", " ": " ", "~": " ", "0": " ", "'": "´", "`": "`", ".": ".", "t": "\t", "_": "_"}


def _unescape(text: str) -> str:
    def repl(m: re.Match) -> str:
        if m["rest"] is not None:
            return ""
        name = m["s1"] or m["s2"] or m["s3"] or m["n1"] or m["n2"]
        if name is not None:
            return _NAMED.get(name, "")
        if m["ch"] is not None:
            return _KEEP.get(m["ch"], m["ch"])
        return ""

    return _ESCAPE.sub(repl, text)


def _macro_args(rest: str) -> list[str]:
    out = []
    for m in re.finditer(r'"((?:[^"]|"")*)"?|(\S+)', rest):
        out.append((m[1] if m[1] is not None else m[2]).replace('""', '"'))
    return out


_FONT_ALT = {"BR", "RB", "IR", "RI", "BI", "IB"}
_FONT_ONE = {"B", "I", "SM", "SB", "R"}
_PARA = {"PP", "LP", "P", "sp", "HP"}
_IGNORE_UNTIL = {"ig": "..", "de": "..", "de1": "..", "am": ".."}


def roff_to_text(src: str) -> str:
    """A man(7) page in plain text: headings on lines of their own, each filled paragraph on
    one line (indented 4 spaces per .RS/.TP/.IP level), no-fill blocks (.nf/.EX, tables) kept
    line for line, font changes and comments dropped, special characters as Unicode."""
    out: list[str] = []
    words: list[str] = []
    state = {"base": 0, "indent": 0, "fill": True, "tag": False, "skip": None, "table": 0}

    def emit(line: str, indent: int) -> None:
        out.append(" " * indent + line if line.strip() else "")

    def flush() -> None:
        if words:
            emit(" ".join(w for w in words if w), state["indent"])
            words.clear()

    def blank() -> None:
        flush()
        if out and out[-1] != "":
            out.append("")

    def text(line: str, verbatim: bool = False) -> None:
        line = _unescape(line)
        if state["tag"]:
            flush()
            emit(line.strip(), 0 if state["tag"] == "head" else state["base"])
            state["indent"] = 0 if state["tag"] == "head" else state["base"] + 4
            state["tag"] = False
        elif verbatim or not state["fill"]:
            flush()
            emit(line.rstrip(), state["indent"])
        elif not line.strip():
            blank()
        else:
            if line[:1].isspace():
                flush()
            words.append(line.strip())

    for raw in src.split("\n"):
        if state["skip"]:
            if raw.strip() == state["skip"]:
                state["skip"] = None
            continue
        if state["table"]:
            if raw.startswith(".TE"):
                state["table"] = 0
                continue
            if state["table"] == 1:  # options and format lines, up to the one ending in "."
                if raw.rstrip().endswith("."):
                    state["table"] = 2
                continue
            if raw.startswith((".", "'")):
                continue
            row = raw.replace("T{", "").replace("T}", "")
            text("  ".join(c.strip() for c in _unescape(row).split("\t")), verbatim=True)
            continue
        if raw.startswith((".", "'")) and not raw.startswith(("'\\\"",)) and len(raw) > 1:
            m = re.match(r"[.'][ \t]*(\S*)[ \t]*(.*)", raw)
            req, rest = m[1], m[2]
        elif raw.startswith(("'\\\"", ".\\\"")) or raw in (".", "'"):
            continue
        else:
            text(raw)
            continue
        if req.startswith('\\"'):
            continue
        args = _macro_args(rest)
        if req in _IGNORE_UNTIL:
            state["skip"] = ".." if not args[1:] else "." + args[1]
        elif req == "TH":
            flush()
            if args:
                emit(f"{args[0]}({args[1] if len(args) > 1 else ''})", 0)
        elif req in ("SH", "SS"):
            blank()
            state.update(base=0, indent=0, tag=False if args else "head")
            if args:
                emit(_unescape(" ".join(args)), 0 if req == "SH" else 2)
        elif req in _PARA:
            blank()
            state.update(indent=state["base"], tag=False)
        elif req in ("TP", "TQ"):
            if req == "TP":
                blank()
            else:
                flush()
            state["tag"] = True
        elif req == "IP":
            blank()
            if args and args[0]:
                emit(_unescape(args[0]), state["base"])
            state["indent"] = state["base"] + 4
        elif req == "RS":
            flush()
            state["base"] += 4
            state["indent"] = state["base"]
        elif req == "RE":
            flush()
            state["base"] = max(0, state["base"] - 4)
            state["indent"] = state["base"]
        elif req in ("nf", "EX"):
            flush()
            state["fill"] = False
        elif req in ("fi", "EE"):
            flush()
            state["fill"] = True
        elif req == "br":
            flush()
        elif req == "TS":
            flush()
            state["table"] = 1
        elif req in _FONT_ALT:
            text("".join(args))
        elif req in _FONT_ONE or req in ("SY", "OP", "UR", "MT"):
            if req in ("UR", "MT"):
                text("<" + " ".join(args) + ">")
            elif req == "OP":
                text("[" + " ".join(args) + "]")
            elif args:
                text(" ".join(args))
        elif req in ("UE", "ME", "YS") and args:
            text("".join(args))
        # every other request (.ad .na .in .ti .ne .PD .IX .if .ie .el .ds .nr .ft .so ...) is dropped
    flush()
    return "\n".join(out) + "\n"
