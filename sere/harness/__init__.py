"""The harness that tests, measures and tunes the SERE runtime; nothing in the runtime imports it.

  methods        comparison routing transforms (random, truncate, oea, drop), registered into
                 sere.transforms on import
  fidelity       quality metrics of a re-routed model against its reference
  report         tables and plots from pytest-benchmark JSON (sere-report)
  settings       the SERE settings benches and gates run (paper's S=1 rho=0, S=2 rho=0.1), defined once
  vllm_hooks     test hooks into an in-process vLLM engine's re-routers (trace, stock routing, overrides)
  model_configs  real-size and tiny configs of the published models
  vllm_testing   tiny local checkpoints and config-only folders vLLM loads without a hub
  zoo            small MoE models trained in the project, their training and the accuracy sweep
  evalbridge     the OpenCompass bridge (paper benchmarks on your own model)
"""
