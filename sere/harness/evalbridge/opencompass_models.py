"""OpenCompass model classes with SERE: the stock HuggingFace model classes, plus a `sere`
parameter that switches SERE on after the model is loaded.

    from sere.harness.evalbridge.opencompass_models import SereHuggingFaceBaseModel
    models = [dict(
        type=SereHuggingFaceBaseModel, abbr="qwen2-moe-sere-s1-r0.1", path="/models/Qwen1.5-MoE-A2.7B",
        sere=dict(select_top_k=1, threshold=0.1),   # similarity: <path>/sere_similarity.safetensors
        max_out_len=512, batch_size=16, run_cfg=dict(num_gpus=1),
    )]

`sere` keys: select_top_k, threshold (required to switch SERE on; sere=None runs the stock
model through the same class), similarity (artifact path; default the model directory),
method ("sere" or a control of sere.harness.methods), layers, layer_overrides, max_tokens (leave
router calls with more tokens untouched, e.g. the batch size to re-route decode steps only),
backend, stats_path (append one JSON line of activated-expert statistics per generate/ppl
call). OpenCompass imports this module by its dotted name: put the repository root on
PYTHONPATH (sere.harness.evalbridge.run does).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from opencompass.models.huggingface_above_v4_33 import HuggingFaceBaseModel, HuggingFacewithChatTemplate

BRIDGE_KEYS = {"stats_path"}  # the bridge's own; every other key is a sere.SereConfig field


def attach_sere(model, model_path: str, settings: Mapping[str, Any] | None):
    """`sere.hf.enable` on a loaded model from the bridge's `sere` dict (parsed once into a
    sere.SereConfig: its fields, plus BRIDGE_KEYS); None for stock."""
    if not settings:
        return None
    if "select_top_k" not in settings or "threshold" not in settings:
        raise ValueError("sere=dict(...) needs select_top_k and threshold (or sere=None for the stock model)")
    from sere.config import SereConfig
    from sere.hf import enable

    fields = {k: v for k, v in settings.items() if k not in BRIDGE_KEYS}
    # The command line hands S and rho over as text in OpenCompass's config: read them as numbers.
    fields.update(select_top_k=int(settings["select_top_k"]), threshold=float(settings["threshold"]))
    fields.setdefault("record_stats", True)
    config = SereConfig.from_dict(fields, source="sere-eval")
    return enable(model, config.similarity or model_path, config=config)


def _restore_batch_encode_plus(tokenizer) -> None:
    """OpenCompass 0.5.4 calls tokenizer.batch_encode_plus, which transformers 5 removed;
    calling the tokenizer itself on a list of texts is what that method did."""
    if not hasattr(tokenizer, "batch_encode_plus"):
        object.__setattr__(tokenizer, "batch_encode_plus", lambda texts, **kw: tokenizer(list(texts), **kw))


class _SereMixin:
    """Switch SERE on after OpenCompass loads the model; log expert statistics per call."""

    def _init_sere(self, path: str, sere: Mapping[str, Any] | None) -> None:
        _restore_batch_encode_plus(self.tokenizer)
        self.sere_settings = dict(sere) if sere else None
        self.sere_handle = None if getattr(self, "tokenizer_only", False) else attach_sere(self.model, path, sere)
        if self.sere_handle is not None:
            self.logger.info(f"SERE on: {self.sere_handle!r}")

    def _report_sere(self, call: str, batch: int) -> None:
        handle = getattr(self, "sere_handle", None)
        if handle is None or handle.stats is None:
            return
        summary = handle.stats.summary()
        handle.stats.reset()
        row = {"call": call, "batch": batch, "settings": {k: v for k, v in self.sere_settings.items() if k != "stats_path"},
               "layers": {str(k): v for k, v in summary.items()}}
        path = self.sere_settings.get("stats_path")
        if path:
            with open(Path(path), "a") as f:
                f.write(json.dumps(row) + "\n")

    def generate(self, inputs, max_out_len, *args, **kwargs):
        out = super().generate(inputs, max_out_len, *args, **kwargs)
        self._report_sere("generate", len(inputs))
        return out

    def get_ppl(self, inputs, *args, **kwargs):
        out = super().get_ppl(inputs, *args, **kwargs)
        self._report_sere("get_ppl", len(inputs))
        return out


class SereHuggingFaceBaseModel(_SereMixin, HuggingFaceBaseModel):
    """OpenCompass `HuggingFaceBaseModel` (base LMs, plain prompts) with a `sere` parameter."""

    def __init__(self, path: str, sere: Mapping[str, Any] | None = None, **kwargs):
        super().__init__(path=path, **kwargs)
        self._init_sere(path, sere)


class SereHuggingFacewithChatTemplate(_SereMixin, HuggingFacewithChatTemplate):
    """OpenCompass `HuggingFacewithChatTemplate` (chat models) with a `sere` parameter."""

    def __init__(self, path: str, sere: Mapping[str, Any] | None = None, **kwargs):
        super().__init__(path=path, **kwargs)
        self._init_sere(path, sere)
