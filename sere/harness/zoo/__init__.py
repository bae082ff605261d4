"""The model zoo: small MoE language models trained in the project on a multi-domain corpus
(archaic and technical English, code, manual pages, four other languages; sere.harness.zoo.corpus),
used to measure what SERE costs in quality (tests/test_accuracy.py, bench/results/accuracy.md).

    from sere.harness.zoo import load_zoo_model, heldout_ids, ZOO_MODELS
    model, tokenizer = load_zoo_model("qwen2_moe", zoo_dir="tests/zoo")  # float32, eval mode, CPU
    ids = heldout_ids(tokenizer, zoo_dir="tests/zoo", domain="pycode")   # one domain's held-out text, N tokens

The zoo folder holds <name>/ per model (config, bf16 safetensors, tokenizer, card, training
log, similarity artifacts) and heldout/<domain>.txt; this repository's is tests/zoo (not package
data: the installed package never looks for it). Name it with the `zoo_dir` argument of each
function here (`--zoo-dir` on the commands), or once with $SERE_ZOO_DIR; the test suite sets
$SERE_ZOO_DIR to tests/zoo itself (conftest.py). The models are built by
`sere-zoo-train --model <name>` (sere.harness.zoo.train) and described in tests/zoo/DATA.md
and each model's README.md.
"""
from __future__ import annotations

import os
from pathlib import Path

from sere.harness.zoo.models import ZOO_MODELS, zoo_config

HELDOUT_DIRNAME = "heldout"
ZOO_DIR_ENV = "SERE_ZOO_DIR"


class ZooDirNotSet(LookupError):
    """Neither a zoo_dir argument nor $SERE_ZOO_DIR says where the zoo is."""


def zoo_dir(path: str | os.PathLike | None = None) -> Path:
    """The zoo folder: `path` if given, else $SERE_ZOO_DIR; ZooDirNotSet if neither is set
    (the folder need not exist yet: training writes into it)."""
    if path is not None and str(path) != "":
        return Path(path)
    env = os.environ.get(ZOO_DIR_ENV)
    if env:
        return Path(env)
    raise ZooDirNotSet(f"no zoo folder: pass --zoo-dir or set {ZOO_DIR_ENV} (this repository's is tests/zoo)")


_zoo_dir = zoo_dir  # for the functions below, whose `zoo_dir` argument hides it


def model_dir(name: str, zoo_dir: str | os.PathLike | None = None) -> Path:
    """Checkpoint folder of zoo model `name` in the zoo folder (see zoo_dir)."""
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO_MODELS)}")
    path = _zoo_dir(zoo_dir) / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"zoo model {name!r} not found at {path}; train it with `sere-zoo-train --model {name} --zoo-dir "
            f"{path.parent}`, or name another zoo folder (--zoo-dir, {ZOO_DIR_ENV})"
        )
    return path


def load_zoo_model(name: str, *, zoo_dir: str | os.PathLike | None = None, dtype=None, device="cpu",
                   experts_implementation: str = "grouped_mm"):
    """(model in eval mode, tokenizer) of zoo model `name`. float32 by default: the stored
    bf16 weights widen exactly, and float32 keeps the reference and re-routed runs comparable.
    experts_implementation: transformers' expert kernel ("grouped_mm" is the fastest on the CPU
    here and gives the same metrics as "eager")."""
    path = model_dir(name, zoo_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, experts_implementation=experts_implementation
    )
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def heldout_texts(zoo_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{domain: held-out text} from <zoo>/heldout/<domain>.txt, domains in name order (the
    training domains and the never-trained family; see <zoo>/DATA.md)."""
    folder = _zoo_dir(zoo_dir) / HELDOUT_DIRNAME
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no held-out texts in {folder} (see tests/zoo/DATA.md)")
    return {f.stem: f.read_text(encoding="utf-8") for f in files}


def heldout_text(zoo_dir: str | os.PathLike | None = None, domain: str | None = None) -> str:
    """One domain's held-out text; domain None: every domain's, in name order, separated by
    blank lines."""
    texts = heldout_texts(zoo_dir)
    if domain is None:
        return "\n\n".join(texts.values())
    if domain not in texts:
        raise ValueError(f"no held-out text for domain {domain!r}; the zoo has {', '.join(texts)}")
    return texts[domain]


def heldout_ids(tokenizer, zoo_dir: str | os.PathLike | None = None, domain: str | None = None):
    """Held-out text (see heldout_text) as one 1-D int64 tensor of token ids."""
    from sere.harness.zoo.data import encode

    return encode(tokenizer, heldout_text(zoo_dir, domain))


__all__ = ["ZOO_DIR_ENV", "ZOO_MODELS", "ZooDirNotSet", "heldout_ids", "heldout_text", "heldout_texts", "load_zoo_model", "model_dir",
           "zoo_config", "zoo_dir"]
