"""vLLM general plugin (entry point group `vllm.general_plugins`, name `sere`): SERE for the
FusedMoE layers of any MoE model.

    pip install -e .   # declares sere = "sere.vllm.plugin:register"; vLLM loads it by itself
    LLM(model=path, hf_overrides={"architectures": ["Qwen2MoeForCausalLMSERE"],
                                  "select_top_k": 1, "threshold": 0.1})           # the paper's way
    LLM(model=path, additional_config={"sere": {"select_top_k": 1, "threshold": 0.1}})  # any MoE model
    vllm serve PATH --hf-overrides '{"architectures": ["Qwen3MoeForCausalLMSERE"], "select_top_k": 2, "threshold": 0.1}'

Settings: sere.vllm.settings. The router wrapper: sere.vllm.router. Similarity: the file
sere_similarity.safetensors in the model folder, or additional_config sere.similarity_path.

vLLM loads general plugins in every process it starts (front end, engine core, workers), so
`register` is cheap: it registers the SERE model classes by name (imported only when a model
is built) and arranges for the model loaders to be patched when vLLM imports them:
  - after a model is loaded, SERE is applied when additional_config["sere"] asks for it (the
    SERE classes apply it themselves), and MoE kernels that would bypass the router are refused;
  - the artifact sere_similarity.safetensors is never read as a weight file (vLLM globs every
    *.safetensors of a folder without an index file).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys

logger = logging.getLogger("sere.vllm")

SERE_ARCHITECTURES = {
    name: f"sere.vllm.models:{name}"
    for name in ("Qwen2MoeForCausalLMSERE", "Qwen3MoeForCausalLMSERE", "DeepseekV2ForCausalLMSERE")
}
_LOADER_PACKAGE = "vllm.model_executor.model_loader"
_PATCHED_FLAG = "_sere_patched"


def register() -> None:
    """Called by vLLM in each of its processes; idempotent."""
    from vllm.model_executor.models import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in SERE_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    if _LOADER_PACKAGE in sys.modules:
        patch_model_loaders()
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Patches vLLM's model loaders right after their package is first imported, so that
    processes which never load a model (the API front end) never import it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _LOADER_PACKAGE:
            return None
        sys.meta_path.remove(self)  # find the real module spec without coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            patch_model_loaders()

        spec.loader.exec_module = exec_then_patch
        return spec


def patch_model_loaders() -> None:
    """Wrap BaseModelLoader.load_model (apply SERE after loading) and
    DefaultModelLoader._prepare_weights (skip the similarity artifact). Idempotent."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if not getattr(BaseModelLoader.load_model, _PATCHED_FLAG, False):
        stock_load_model = BaseModelLoader.load_model

        def load_model(self, vllm_config, model_config, *args, **kwargs):
            model = stock_load_model(self, vllm_config, model_config, *args, **kwargs)
            _after_load(model, vllm_config, model_config)
            return model

        setattr(load_model, _PATCHED_FLAG, True)
        load_model.__wrapped__ = stock_load_model
        BaseModelLoader.load_model = load_model

    if not getattr(DefaultModelLoader._prepare_weights, _PATCHED_FLAG, False):
        stock_prepare = DefaultModelLoader._prepare_weights

        def _prepare_weights(self, *args, **kwargs):
            out = stock_prepare(self, *args, **kwargs)  # (folder, files, use_safetensors[, index])
            files = [f for f in out[1] if os.path.basename(f) != _artifact_name()]
            return (out[0], files, *out[2:])

        setattr(_prepare_weights, _PATCHED_FLAG, True)
        _prepare_weights.__wrapped__ = stock_prepare
        DefaultModelLoader._prepare_weights = _prepare_weights


def _artifact_name() -> str:
    from sere.artifact import ARTIFACT_FILENAME

    return ARTIFACT_FILENAME


def _after_load(model, vllm_config, model_config) -> None:
    from sere.vllm.router import apply_sere, check_routed_through_router, resolve_merge_support
    from sere.vllm.settings import read_settings

    if model_config is not getattr(vllm_config, "model_config", model_config):
        return  # a draft model (speculative decoding): SERE applies to the main model only
    settings = read_settings(vllm_config)
    if settings is None:
        return
    # The SERE model classes have wrapped their routers already; apply_sere then returns them.
    sites = apply_sere(model, vllm_config, settings)
    check_routed_through_router(sites)
    resolve_merge_support(sites, required=settings.merge_slots is True)
