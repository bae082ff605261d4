"""The multi-domain corpus of the zoo (sere.harness.zoo.corpus), through its committed files:
held-out texts and manifest (tests/zoo/heldout/), tokenizer (tests/zoo/tokenizer/), calibration
texts (calibration/data/), tune sample (sere/harness/data/tune_sample.jsonl).

    pytest tests/test_corpus.py -m "not slow"     # the committed files only: CPU, no network
    pytest tests/test_corpus.py                   # also the rebuild from apt, compared byte for byte
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELD = ROOT / "tests/zoo/heldout"
TOKENIZER = ROOT / "tests/zoo/tokenizer"
MIX = ROOT / "calibration/data/multidomain_mix.txt"
TUNE = ROOT / "sere/harness/data/tune_sample.jsonl"
EOS = "<|endoftext|>"
if not (ROOT / "tests/zoo").is_dir():  # a device call's copy leaves the zoo out for size; a checkout has it
    pytest.skip("tests/zoo is not in this copy of the tree", allow_module_level=True)
MANIFEST = json.loads((HELD / "manifest.json").read_text())
DOMAINS = MANIFEST["domains"]
NEVER = MANIFEST["never_trained"]
TRAINED = [d for d in DOMAINS if d not in NEVER]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def heldout_text(domain: str) -> str:
    return (HELD / f"{domain}.txt").read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_heldout_files_cover_the_domains():
    assert len(TRAINED) >= 5 and NEVER == ["en_fortunes"]
    assert {"kjv", "pydoc", "pycode", "man"} <= set(TRAINED)
    assert len([d for d in TRAINED if d in ("de", "es", "it", "ru", "zh")]) >= 2  # languages other than English
    assert sorted(p.stem for p in HELD.glob("*.txt")) == sorted(DOMAINS)
    for domain in DOMAINS:
        raw = (HELD / f"{domain}.txt").read_bytes()
        assert 50_000 <= len(raw) <= 100_000, domain
        raw.decode("utf-8")  # valid UTF-8
        entry = DOMAINS[domain]["splits"]["heldout"]
        assert sha256(raw) == entry["sha256"] and len(raw) == entry["bytes"], domain
        assert raw.decode().count(EOS) == entry["documents"] - 1 >= 5, domain


def test_splits_are_disjoint_and_balanced():
    for domain, d in DOMAINS.items():
        splits = d["splits"]
        if domain in NEVER:
            assert set(splits) == {"heldout"}, "the never-trained family has no training or validation text"
            continue
        assert set(splits["heldout"]["names"]).isdisjoint(splits["validation"]["names"]), domain
        assert 50_000 <= splits["validation"]["bytes"] <= 100_000, domain
        assert 500_000 <= splits["train"]["bytes"] <= MANIFEST["train_cap_bytes"] + 20_000, domain
        assert d["licence"] and d["packages"], domain


def test_tokenizer_loads_and_round_trips_every_domain(tok):
    assert len(tok) == 12288
    assert tok.eos_token == tok.pad_token == EOS and tok.convert_tokens_to_ids(EOS) == MANIFEST["tokenizer"]["eos_id"]
    assert sha256((TOKENIZER / "tokenizer.json").read_bytes()) == MANIFEST["tokenizer"]["files"]["tokenizer.json"]
    for domain in DOMAINS:
        text = heldout_text(domain)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # The file tokenizes to its .npy: the documents' tokens separated by the EOS id.
        assert len(ids) == DOMAINS[domain]["splits"]["heldout"]["tokens"], domain
        assert tok.decode(ids) == text, domain
        first = text.split(EOS)[0]
        assert tok.decode(tok(first, add_special_tokens=False)["input_ids"]) == first, domain
        assert len(ids) / len(text.encode()) < 0.5, f"{domain}: {len(ids) / len(text.encode()):.2f} tokens per byte"


def test_calibration_texts_come_from_training_documents():
    from calibration.data import read_texts

    held_names = {(dom, n) for dom, d in DOMAINS.items() for s in ("heldout", "validation") for n in d["splits"].get(s, {}).get("names", [])}
    for dom, names in MANIFEST["calibration"].items():
        assert dom in TRAINED
        for name in names:
            assert not any((dom, part) in held_names for part in name.split("+")), (dom, name)
    for rel, digest in MANIFEST["calibration_sha256"].items():
        assert sha256((ROOT / rel).read_bytes()) == digest, rel
    mix = read_texts(MIX)
    assert 150_000 <= MIX.stat().st_size <= 250_000 and len(mix.texts) == 5 * len(TRAINED)
    for dom in TRAINED:
        assert len(read_texts(ROOT / f"calibration/data/domains/{dom}.txt").texts) == 15, dom
    held = "".join(heldout_text(d) for d in DOMAINS)
    assert not any(t in held for t in mix.texts)
    long_lines = [line for t in mix.texts for line in t.split("\n") if len(line.strip()) >= 100]
    assert len(long_lines) > 50 and not [line for line in long_lines if line in held]
    # Shorter lines may be shared boilerplate (licence headers, man-page stock sentences).
    lines = [line for t in mix.texts for line in t.split("\n") if len(line.strip()) >= 60]
    assert sum(line in held for line in lines) <= 0.02 * len(lines)


def test_tune_sample_is_held_out_and_covers_every_domain():
    raw = TUNE.read_bytes()
    assert sha256(raw) == MANIFEST["tune_sample_sha256"] and 100_000 <= len(raw) <= 220_000
    rows = [json.loads(line) for line in raw.decode().splitlines()]
    assert {r["domain"] for r in rows} == set(DOMAINS)
    for r in rows:
        assert set(r) == {"domain", "doc", "text"}
        assert r["doc"] in DOMAINS[r["domain"]]["splits"]["heldout"]["names"], r["doc"]
        assert 1000 <= len(r["text"].encode()) <= 3000 and r["text"] in heldout_text(r["domain"])


@pytest.mark.slow
def test_rebuild_from_apt_is_byte_for_byte(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get and dpkg-deb are needed to rebuild the corpus from the Debian packages")
    from sere.harness.zoo import corpus

    try:
        manifest = corpus.build(tmp_path / "corpus", repo=tmp_path / "repo")
    except RuntimeError as e:
        if "apt-get download" in str(e):
            pytest.skip(f"the pinned packages could not be downloaded: {e}")
        raise
    assert json.loads(json.dumps(manifest)) == MANIFEST
    for f in sorted((tmp_path / "repo").rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (ROOT / f.relative_to(tmp_path / "repo")).read_bytes(), f


def test_a_missing_pin_refreshes_the_package_lists_once(tmp_path, monkeypatch):
    # A fresh machine's apt lists can predate the security release a pin names: as root the
    # download is retried once after `apt-get update`; a second failure is the caller's error.
    import subprocess

    from sere.harness.zoo import corpus_sources as cs

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[:2])
        if cmd[1] == "download" and ["apt-get", "update"] not in calls:
            raise subprocess.CalledProcessError(100, cmd, stderr="E: Version not found")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cs.subprocess, "run", fake_run)
    monkeypatch.setattr(cs.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cs, "_lists_updated", False)
    cs.apt_download("fortunes", "1:1.99.1-7.3", tmp_path)
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    calls.clear()  # lists refreshed already: no second update
    with pytest.raises(subprocess.CalledProcessError):
        cs.apt_download("fortunes", "1:1.99.1-7.3", tmp_path)
    assert calls == [["apt-get", "download"]]
    monkeypatch.setattr(cs, "_lists_updated", False)
    monkeypatch.setenv("SERE_APT_UPDATE", "0")
    calls.clear()
    with pytest.raises(subprocess.CalledProcessError):
        cs.apt_download("fortunes", "1:1.99.1-7.3", tmp_path)
    assert calls == [["apt-get", "download"]]
