"""The model zoo: small MoE language models trained in the project on the King James Bible,
used to measure what SERE costs in quality (tests/test_accuracy.py, bench/results/accuracy.md).

    from sere.harness.zoo import load_zoo_model, heldout_ids, ZOO_MODELS
    model, tokenizer = load_zoo_model("qwen2_moe")        # float32, eval mode, CPU
    ids = heldout_ids(tokenizer)                          # the committed held-out text, N tokens

The checkpoints live in tests/zoo/<name>/ (config, fp16 safetensors, tokenizer, card,
training log, similarity artifact); `SERE_ZOO_DIR` points elsewhere. They are built by
`python -m sere.harness.zoo.train --model <name>` (see its docstring) and described in
tests/zoo/DATA.md and each model's README.md.
"""
from __future__ import annotations

import os
from pathlib import Path

from sere.harness.zoo.models import ZOO_MODELS, zoo_config

HELDOUT_FILENAME = "heldout.txt"


def zoo_dir() -> Path:
    """Where the zoo's checkpoints are: $SERE_ZOO_DIR, else tests/zoo of this checkout."""
    env = os.environ.get("SERE_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "tests" / "zoo"


def model_dir(name: str) -> Path:
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO_MODELS)}")
    path = zoo_dir() / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"zoo model {name!r} not found at {path}; train it with `python -m sere.harness.zoo.train --model {name}` "
            "or set SERE_ZOO_DIR"
        )
    return path


def load_zoo_model(name: str, *, dtype=None, device="cpu", experts_implementation: str = "grouped_mm"):
    """(model in eval mode, tokenizer) of zoo model `name`. float32 by default: the stored
    fp16 weights widen exactly, and float32 keeps the reference and re-routed runs comparable.
    experts_implementation: transformers' expert kernel ("grouped_mm" is the fastest on the CPU
    here and gives the same metrics as "eager")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, experts_implementation=experts_implementation
    )
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def heldout_text() -> str:
    path = zoo_dir() / HELDOUT_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"held-out text not found at {path} (see tests/zoo/DATA.md)")
    return path.read_text()


def heldout_ids(tokenizer):
    """The committed held-out text as one 1-D int64 tensor of token ids."""
    from sere.harness.zoo.data import encode

    return encode(tokenizer, heldout_text())


__all__ = ["ZOO_MODELS", "heldout_ids", "heldout_text", "load_zoo_model", "model_dir", "zoo_config", "zoo_dir"]
