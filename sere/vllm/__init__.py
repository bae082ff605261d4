"""vLLM integration (see sere.vllm.plugin)."""
