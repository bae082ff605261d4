"""The paper's interface: vLLM's own MoE model classes with SERE switched on at construction.

    LLM(model=path, hf_overrides={"architectures": ["Qwen2MoeForCausalLMSERE"],
                                  "select_top_k": 1, "threshold": 0.1})

Each class is a subclass of vLLM's stock class that, once the stock constructor has built the
layers, wraps every FusedMoE router (sere.vllm.router.apply_sere). Nothing else differs: the
weights, their loading and the forward pass are the stock ones. Registered with vLLM's
ModelRegistry by sere.vllm.plugin.register (lazily, by "module:Class" name).
"""
from __future__ import annotations

from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM


def _enable_sere(model, vllm_config) -> None:
    from sere.vllm.router import apply_sere
    from sere.vllm.settings import read_settings

    apply_sere(model, vllm_config, read_settings(vllm_config, required=True))


class Qwen2MoeForCausalLMSERE(Qwen2MoeForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _enable_sere(self, vllm_config)


class Qwen3MoeForCausalLMSERE(Qwen3MoeForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _enable_sere(self, vllm_config)


class DeepseekV2ForCausalLMSERE(DeepseekV2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _enable_sere(self, vllm_config)


SERE_MODELS = {cls.__name__: cls for cls in (Qwen2MoeForCausalLMSERE, Qwen3MoeForCausalLMSERE, DeepseekV2ForCausalLMSERE)}
